"""The running batch of continuous batching: sequences that joined at different steps, decoded together one token
per row per step, every row's state in one transformers cache.

Glossary (shapes of transformers 5's ``DynamicCache`` layers, per row b of the batch):

* a Mamba-2 mixer (``LinearAttentionLayer``): the conv window ``conv_states[0]`` (B, conv_dim, K) and the SSM
  state ``recurrent_states[0]`` (B, H, P, N): a fixed size whatever the sequence's length, so a row can join or
  leave the batch at any step;
* an attention layer (``DynamicLayer``, the layers a hybrid student kept): keys and values (B, heads, T, d), one
  position per token seen. Rows of different lengths share T: each row's positions are right-aligned (left
  padding), and ``Batch.mask`` (B, T) marks the positions that hold a token (1) or padding (0).

What transformers gives and this module uses: the cache classes themselves (filled by the model's own forward),
``Cache.reorder_cache(index)`` to keep a subset of rows (written for beam search; it handles both layer kinds),
the 2-D padding mask and ``position_ids`` the forward already takes. What it does not have, written here by hand:

* ``merge``: joining two caches along the batch (rows prefilled in a batch of their own join the running one):
  SSM and conv states are concatenated; keys and values are left-padded with zeros to the longer of the two and
  the padding is masked out;
* ``Batch.keep``'s trim: when the longest rows have retired, the leading KV columns no row uses any more are cut
  (else the batch would attend over the longest length it ever held).

Exactness. Left padding is exact for the Mamba-2 mixers (padded positions are zeroed before the input projection
and after the convolution, so they leave the state at zero) and for attention (masked keys get no weight), so a
row decodes to what it would alone, up to the float summation order of a batched matmul. ``position_ids`` carry
each row's own positions (its rotary embeddings), whatever the padding.

Caches with other layer kinds (sliding windows, quantized or static layers) are refused (``check_supported``): the
static scheduler (``batch.scheduler: static``) serves those models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from app.serve.generate import Row


def new_cache(model: Any) -> Any:
    """An empty cache of the model's own kind (``generation_cache``: the 0-attention hybrid's; else DynamicCache)."""
    from transformers import DynamicCache

    from app.caches import generation_cache

    return generation_cache(model) or DynamicCache(config=model.config)


def _kinds(cache: Any) -> list[str]:
    """Each layer's kind: "ssm" (a linear-attention layer: conv + recurrent state) or "kv" (keys and values)."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

    kinds = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, DynamicLayer):
            kinds.append("ssm")
        elif type(layer) is DynamicLayer:
            kinds.append("kv")
        else:
            raise NotImplementedError(f"continuous batching cannot merge a cache layer of kind {type(layer).__name__} "
                                      f"(layer {i}); serve this model with batch.scheduler=static")
    return kinds


def check_supported(model: Any) -> bool:
    """Whether the model's cache is one ``merge`` handles (raises NotImplementedError naming the layer if not);
    returns whether the model has attention layers (then rows carry a KV mask and position ids)."""
    return "kv" in _kinds(new_cache(model))


@dataclass
class Batch:
    """Rows decoded together and their state. ``last`` is each row's newest token, sampled and not yet fed."""

    rows: list[Row]
    cache: Any
    last: Any  # (B,) long
    positions: Any  # (B,) long: the position the row's ``last`` token takes when fed
    kinds: list[str]  # each cache layer's kind (``_kinds``), read once when the batch is made
    mask: Optional[Any] = None  # (B, T) long, models with attention layers: 1 where the KV cache holds a token

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at ``index`` (in that order): the others' state is freed."""
        import torch

        if index == list(range(len(self.rows))):
            return
        idx = torch.tensor(index, dtype=torch.long, device=self.last.device)
        self.rows = [self.rows[i] for i in index]
        self.cache.reorder_cache(idx)
        self.last, self.positions = self.last[idx], self.positions[idx]
        if self.mask is not None:
            self.mask = self.mask[idx]
            used = self.mask.any(0).nonzero()
            cut = int(used[0]) if len(used) else self.mask.shape[1]
            if cut:  # leading positions no row holds a token in any more
                self.mask = self.mask[:, cut:]
                for layer, kind in zip(self.cache.layers, self.kinds):
                    if kind == "kv" and layer.is_initialized:
                        layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]


def _left_pad(t: Any, length: int, dim: int) -> Any:
    """``t`` with zeros added at the front of ``dim`` up to ``length``."""
    import torch

    short = length - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(a: Optional[Batch], b: Batch) -> Batch:
    """The rows of ``a`` then those of ``b`` as one batch (``a``'s cache object, extended; ``b`` is used up)."""
    import torch

    if a is None or not len(a):
        return b
    if a.mask is not None:
        t = max(a.mask.shape[1], b.mask.shape[1])
        a.mask = torch.cat([_left_pad(a.mask, t, 1), _left_pad(b.mask, t, 1)])
    for la, lb, kind in zip(a.cache.layers, b.cache.layers, a.kinds):
        if kind == "ssm":
            for s in range(la.number_of_states):
                if la.is_conv_states_initialized[s]:
                    la.conv_states[s] = torch.cat([la.conv_states[s], lb.conv_states[s]])
                if la.is_recurrent_states_initialized[s]:
                    la.recurrent_states[s] = torch.cat([la.recurrent_states[s], lb.recurrent_states[s]])
        else:  # keys and values (B, heads, T, d), right-aligned to the merged mask's length
            la.keys = torch.cat([_left_pad(la.keys, t, 2), _left_pad(lb.keys, t, 2)])
            la.values = torch.cat([_left_pad(la.values, t, 2), _left_pad(lb.values, t, 2)])
    if hasattr(a.cache, "seen_tokens"):  # RecurrentCache: its count sizes the (unused) causal mask
        a.cache.seen_tokens = max(a.cache.seen_tokens, b.cache.seen_tokens)
    a.rows = a.rows + b.rows
    a.last, a.positions = torch.cat([a.last, b.last]), torch.cat([a.positions, b.positions])
    return a


def prefill(model: Any, rows: list[Row], pad_id: int, attention: bool) -> tuple[Batch, Any]:
    """One forward over the rows' prompts (left-padded, in a cache of their own): their batch and the logits of
    each row's last prompt position (B, V), in float32."""
    import torch

    device = next(model.parameters()).device
    longest = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, longest - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = new_cache(model)
    extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if attention else {}
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
    lengths = mask.sum(-1)
    batch = Batch(rows=list(rows), cache=cache, last=torch.zeros(len(rows), dtype=torch.long, device=device),
                  positions=lengths, kinds=_kinds(cache), mask=mask if attention else None)
    return batch, out.logits[:, -1].float()


class CacheCost(NamedTuple):
    """The bytes one row of a batch holds in the cache: ``fixed`` (SSM and conv states) + ``per_token`` x the
    batch's KV length (attention layers' keys and values)."""

    fixed: int
    per_token: int


def cache_bytes(cache: Any) -> int:
    """The bytes a cache's tensors hold now."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            total += t.nbytes if t is not None and hasattr(t, "nbytes") else 0
        for name in ("conv_states", "recurrent_states"):  # {state index: tensor or None}
            states = getattr(layer, name, None) or {}
            for t in states.values() if isinstance(states, dict) else states:
                total += t.nbytes if t is not None and hasattr(t, "nbytes") else 0
    return total


def measure_cache_cost(model: Any, pad_id: int, attention: bool) -> CacheCost:
    """``CacheCost`` measured on the model itself: the caches of one row of 1 and of 2 tokens (two tiny
    forwards), in the model's own dtype and layer kinds."""
    import torch

    from app.serve.generate import SamplingParams

    with torch.inference_mode():
        one, two = (cache_bytes(prefill(model, [Row([pad_id] * n, SamplingParams())], pad_id, attention)[0].cache)
                    for n in (1, 2))
    per_token = max(two - one, 0)
    return CacheCost(max(one - per_token, 0), per_token)


def decode(model: Any, batch: Batch) -> Any:
    """Feed every row's ``last`` token (one step): the logits of the next token (B, V), in float32."""
    import torch

    kw: dict[str, Any] = {}
    if batch.mask is not None:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], 1)
        kw = {"attention_mask": batch.mask, "position_ids": batch.positions[:, None]}
    out = model(input_ids=batch.last[:, None], cache=batch.cache, use_cache=True, **kw)
    batch.positions = batch.positions + 1
    return out.logits[:, -1].float()
