"""Span log-likelihoods under causal LMs, and the Ray Data actor that aligns texts and scores their spans.

    token_logprobs   log p(token | start token + the window's tokens before it), for every token of a batch of
                     windows, differentiable when asked (the LoRA fit uses it); the output layer runs in
                     chunks over the real positions only (no (B, T, V) logits), checkpointed when training
    span_sums        those summed per span: ℓ_M(span), the model's log-likelihood of the span's bytes
    SpanScorer       Ray Data callable class (the refine scorer's actor pattern: every model loaded once per
                     actor): text rows -> one row per window of aligned spans, with ℓ under each model
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

ROLES = ("transfer", "retain", "eval_domain", "eval_general")


def _text_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _softcap(model: Any) -> Optional[float]:
    return getattr(_text_config(model), "final_logit_softcapping", None)


def _logit_multiplier(model: Any) -> float:
    """What the model's own forward multiplies ``lm_head``'s output by: 1 / ``logits_scaling`` (Granite),
    ``logit_scale`` (Cohere, Cohere 2), else 1."""
    mult = 1.0
    scaling = getattr(_text_config(model), "logits_scaling", None)
    if scaling:
        mult /= float(scaling)
    scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the model (a float from its config)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        mult *= float(scale)
    return mult


def _max_positions(model: Any) -> Optional[int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def batch_inputs(seqs: Sequence[Sequence[int]], start_id: int, pad_id: int, device: Any):
    """(ids, mask) of shape (B, 1 + longest): each row the start token, its tokens, then padding."""
    import torch

    T = 1 + max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, 0] = start_id
        ids[r, 1:1 + len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[r, : 1 + len(s)] = 1
    return ids.to(device), mask.to(device)


def predicting_hidden(inner: Any, ids, mask):
    """(h, y): the last hidden state at every position whose next token is real (N, H), and that token (N,)."""
    hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    sel = mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    return hidden[:, :-1][sel], ids[:, 1:][sel]


def head_logits(inner: Any, h):
    """The model's logits at hidden states h (C, H) -> (C, V) fp32: its output layer, then what its forward does
    after it (``logits_scaling``, ``logit_scale``, the final soft-cap). ``check_head_path`` compares this with the
    model's own forward, so a class that does something else is refused rather than scored wrongly."""
    import torch

    logits = inner.get_output_embeddings()(h).float()
    mult = _logit_multiplier(inner)
    if mult != 1.0:
        logits = logits * mult
    cap = _softcap(inner)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logprobs(inner: Any, h):
    """log_softmax of ``head_logits``: (C, V) fp32."""
    import torch

    return torch.log_softmax(head_logits(inner, h), -1)


def check_head_path(model: Any, start_id: int, pad_id: int) -> None:
    """Raise DeltaError when the hand-built head path (the body's hidden states -> ``head_logits``) does not give
    the model's own forward's logits on a short probe (an architecture whose forward does more after its body)."""
    import torch

    from app.delta.checkpoint import DeltaError

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(inner.parameters()).device
    vocab = inner.get_output_embeddings().weight.shape[0]
    probe = [[(start_id + 1 + 7 * k) % vocab for k in range(8)]]
    ids, mask = batch_inputs(probe, start_id, pad_id, device)
    with torch.inference_mode():
        own = inner(input_ids=ids, attention_mask=mask).logits[0, :-1].float()  # (T-1, V)
        h, _ = predicting_hidden(inner, ids, mask)
        ours = head_logits(inner, h)
    tol = 1e-3 if next(inner.parameters()).dtype == torch.float32 else 3e-2
    err = float((own - ours).abs().max() / own.abs().max().clamp_min(1e-6))
    if not err <= tol:
        raise DeltaError(f"{type(inner).__name__}: its forward's logits differ from the span scorer's head path "
                         f"(relative error {err:.2g}): this architecture does something after its output layer that "
                         "the transfer does not reproduce")


def token_logprobs(model: Any, seqs: Sequence[Sequence[int]], start_id: int, pad_id: int, *, chunk: int = 2048,
                   grad: bool = False):
    """(logp, rows): log-probabilities of every token of every sequence, each sequence scored after
    ``start_id``, flat in row order (N,), and the row of each. Works for a PeftModel (its LoRA layers live in
    the base model's modules). With ``grad``, each chunk of the output layer is recomputed in the backward
    pass (checkpointed), so only one (chunk, V) block of logits is alive at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(inner.parameters()).device
    ids, mask = batch_inputs(seqs, start_id, pad_id, device)

    def chunk_logp(h, y):
        return head_logprobs(inner, h).gather(1, y[:, None])[:, 0]

    with torch.set_grad_enabled(grad):
        h, y = predicting_hidden(inner, ids, mask)
        parts = []
        for lo in range(0, h.shape[0], chunk):
            hc, yc = h[lo:lo + chunk], y[lo:lo + chunk]
            parts.append(checkpoint(chunk_logp, hc, yc, use_reentrant=False) if grad else chunk_logp(hc, yc))
        logp = torch.cat(parts)
    rows = torch.repeat_interleave(torch.arange(len(seqs), device=device),
                                   torch.as_tensor([len(s) for s in seqs], device=device))
    return logp, rows


def span_sums(logp, spans: Sequence[Sequence[int]], n_spans: Sequence[int]):
    """Per-token log-probabilities (flat, row order) summed per span: a list of (n_spans[r],) tensors."""
    import torch

    offsets = np.concatenate([[0], np.cumsum(n_spans)])
    flat = torch.as_tensor(np.concatenate([np.asarray(s, dtype=np.int64) + offsets[r] for r, s in enumerate(spans)]),
                           device=logp.device)
    total = torch.zeros(int(offsets[-1]), dtype=logp.dtype, device=logp.device).index_add(0, flat, logp)
    return [total[offsets[r]:offsets[r + 1]] for r in range(len(spans))]


def score_windows(model: Any, ids: list, spans: list, n_spans: list, start_id: int, pad_id: int, *,
                  batch_tokens: int = 8192, chunk: int = 2048) -> list[np.ndarray]:
    """ℓ per span of each window (float64 arrays), no gradient, micro-batches packed by length."""
    import torch

    from app.refine.perplexity import pack

    out: list = [None] * len(ids)
    with torch.inference_mode():
        for batch in pack([len(x) + 1 for x in ids], batch_tokens):
            logp, _ = token_logprobs(model, [ids[i] for i in batch], start_id, pad_id, chunk=chunk)
            for i, s in zip(batch, span_sums(logp.double(), [spans[i] for i in batch], [n_spans[i] for i in batch])):
                out[i] = s.cpu().numpy()
    return out


def heldout(text: str, fraction: float) -> bool:
    """A text's split, from a hash of its content (the same wherever the text lives)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return (h % 1_000_000) < fraction * 1_000_000


WINDOW_SCHEMA = pa.schema([
    ("doc", pa.string()), ("role", pa.string()), ("window", pa.int32()),
    ("ids_a", pa.list_(pa.int32())), ("ids_b", pa.list_(pa.int32())),
    ("span_a", pa.list_(pa.int32())), ("span_b", pa.list_(pa.int32())),
    ("span_bytes", pa.list_(pa.int32())), ("n_spans", pa.int32()), ("one_to_one", pa.int32()),
    ("text_bytes", pa.int64()), ("dropped_bytes", pa.int64()), ("refused", pa.bool_()),
])


def _empty_row(doc: str, role: str, n_bytes: int, *, dropped: int, refused: bool) -> dict:
    """The one row of a text with no window: refused (its bytes counted in ``text_bytes``), or every span too
    long for a window (``dropped_bytes``)."""
    return dict(doc=doc, role=role, window=0, ids_a=[], ids_b=[], span_a=[], span_b=[], span_bytes=[], n_spans=0,
                one_to_one=0, text_bytes=n_bytes, dropped_bytes=dropped, refused=refused)


class SpanScorer:
    """Ray Data callable class: rows ``id``, ``text``, ``role`` (+ ``error`` from the corpus reader) -> one row
    per window: tokens and spans under both tokenizers, and ``l_<name>`` (ℓ per span) under each model.

    ``models``: name -> (reference, side), side "a" (scored on A's tokens) or "b"; A-side models are not run on
    ``retain`` rows (the retain term needs only B).
    ``split``: role -> held-out fraction; a held-out text of role R becomes ``eval_<...>`` (transfer ->
    eval_domain, retain -> eval_general). Texts that a tokenizer cannot rebuild, or malformed records, give
    one row with ``refused`` set and no windows.
    ``dtype``: every model is loaded in it (a torch dtype name): the scores compared with the fit's and the
    adapters' are computed in one dtype, whatever the device.
    """

    def __init__(self, models: dict[str, tuple[str, str]], *, max_tokens: int, split: dict[str, float],
                 batch_tokens: int = 8192, device: Optional[str] = None, dtype: str = "float32"):
        import torch

        from app.delta.spans import TokenBytes, start_token
        from app.models import load_causal_lm

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.models, self.side = {}, {}
        loaded: dict[str, Any] = {}
        for name, (ref, side) in models.items():
            if ref not in loaded:
                loaded[ref] = load_causal_lm(ref, device=self.device, dtype=getattr(torch, dtype))
            self.models[name], self.side[name] = loaded[ref], side
        tok_of: dict[str, Any] = {}
        for name, lm in self.models.items():
            tok_of.setdefault(self.side[name], lm.tokenizer)
        self.tb = {side: TokenBytes(tok) for side, tok in tok_of.items()}
        self.start = {side: start_token(tok) for side, tok in tok_of.items()}
        self.pad = {side: (tok.pad_token_id if tok.pad_token_id is not None else 0) for side, tok in tok_of.items()}
        for name, lm in self.models.items():
            check_head_path(lm.model, self.start[self.side[name]], self.pad[self.side[name]])
        # windows are cut to fit each model's positions (the start token included)
        self.max_tokens = {side: max_tokens for side in tok_of}
        for name, lm in self.models.items():
            limit = _max_positions(lm.model)
            if limit:
                self.max_tokens[self.side[name]] = min(self.max_tokens[self.side[name]], limit - 1)
        self.split = split
        self.batch_tokens = batch_tokens

    def _windows(self, table: pa.Table) -> list[dict]:
        from app.delta.spans import align, windows

        rows = []
        ids = table.column("id").to_pylist()
        texts = table.column("text").to_pylist()
        roles = table.column("role").to_pylist()
        errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * len(ids)
        for doc, text, role, err in zip(ids, texts, roles, errors):
            if role in ("transfer", "retain") and text is not None and heldout(text, self.split.get(role, 0.0)):
                role = "eval_domain" if role == "transfer" else "eval_general"
            n_bytes = len(text.encode("utf-8")) if isinstance(text, str) else 0
            al = align(text, self.tb["a"], self.tb["b"]) if err is None and isinstance(text, str) and text else None
            if al is None:
                rows.append(_empty_row(doc, role, n_bytes, dropped=0, refused=True))
                continue
            wins, dropped = windows(al, self.max_tokens["a"], self.max_tokens["b"])
            for k, w in enumerate(wins):
                rows.append(dict(doc=doc, role=role, window=k, ids_a=w.ids_a, ids_b=w.ids_b, span_a=w.span_a,
                                 span_b=w.span_b, span_bytes=w.span_bytes, n_spans=len(w.span_bytes),
                                 one_to_one=w.one_to_one, text_bytes=n_bytes if k == 0 else 0,
                                 dropped_bytes=dropped if k == 0 else 0, refused=False))
            if not wins:
                rows.append(_empty_row(doc, role, n_bytes, dropped=dropped, refused=False))
        return rows

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = self._windows(table)
        out = pa.Table.from_pylist(rows, schema=WINDOW_SCHEMA)
        for name, lm in self.models.items():
            side = self.side[name]
            todo = [i for i, r in enumerate(rows) if r["n_spans"] and not (side == "a" and r["role"] == "retain")]
            scores = score_windows(lm.model, [rows[i][f"ids_{side}"] for i in todo],
                                   [rows[i][f"span_{side}"] for i in todo], [rows[i]["n_spans"] for i in todo],
                                   self.start[side], self.pad[side], batch_tokens=self.batch_tokens)
            col: list = [None] * len(rows)
            for i, s in zip(todo, scores):
                col[i] = s.tolist()
            out = out.append_column(f"l_{name}", pa.array(col, pa.list_(pa.float64())))
        return out
