"""Batched sampling with the model's own cache: the engine behind the OpenAI-compatible server.

The per-row pieces here serve both schedulers: ``start_rows`` (each row's generator and detokenization offsets),
``pick_tokens`` / ``sample_row`` (each row's draw), ``RowStopper.step`` (each row's text and end). The continuous
scheduler (``app.serve.scheduler``) drives them from its own decode loop; the static one calls ``Engine.run``.

``Engine.run(rows)`` left-pads the prompts of many requests into one batch and runs transformers' ``generate``
once: the prompts are prefilled in one forward, and every later step feeds one token per row with the cache
(Mamba-2: the recurrent SSM state and the conv window, so a step costs O(1) in the sequence length; attention
models: the KV cache; hybrid students, both; a hybrid student with no attention layer gets the cache
``app.caches.generation_cache`` makes, which transformers cannot make for it). Left padding is exact for
Mamba-2 mixers: the padded positions are zeroed before the input projection and after the convolution, so they
leave the state at zero.

What ``generate`` does not do per row is ours, in two hooks:

* ``RowSampler`` (a logits processor) draws each row's token with the row's own temperature, top-p and seeded
  ``torch.Generator`` and returns scores whose argmax is that draw, so ``generate`` runs in greedy mode and a
  row at temperature 0 is plain greedy decoding (token for token what ``model.generate(do_sample=False)`` gives);
* ``RowStopper`` (a stopping criterion) ends each row at its own ``max_tokens``, EOS or stop string, turns new
  tokens into text (incremental detokenization: a small window of tokens decoded twice, as TGI and vLLM do, so
  a step costs O(1); incomplete UTF-8 and a possible stop-string prefix are held back) and hands each delta to
  the row's ``sink`` as it comes, which is what streaming is built on.

A row that fails in either hook (a seed its generator refuses, logits that give no distribution, a tokenizer
error) ends alone, with ``finish_reason`` "error" and the exception in ``Row.error``; the other rows of the batch
go on. Only a failure of the model's forward itself ends the whole batch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

# vLLM's window for incremental detokenization: decode from a few tokens back so merges and spaces come out right
_PREFIX_TOKENS = 5
# Below this temperature a row is decoded greedily (vLLM's _SAMPLING_EPS): logits / 1e-39 overflow to inf, and
# softmax of that is NaN.
MIN_TEMPERATURE = 1e-5
# Seeds of the rows' generators are taken modulo 2**63 (torch.Generator.manual_seed takes a 64-bit integer).
SEED_MODULUS = 1 << 63


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """New tokens at most (the row ends with finish_reason "length")."""
    temperature: float = 1.0
    """Below MIN_TEMPERATURE (0 included): greedy; otherwise logits / temperature before the softmax."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Strings that end the row; the text returned stops before the first one (finish_reason "stop"). A special
    token's text (``"<|im_end|>"``) matches too: the text keeps the special tokens a stop string names."""
    seed: Optional[int] = None
    """Seed of the row's own generator, taken modulo 2**63 (None: drawn from os.urandom)."""
    ignore_eos: bool = False
    """Go on past EOS to max_tokens (vLLM's extension; for benchmarks with fixed output lengths)."""


Sink = Callable[[str, Optional[str]], None]


@dataclass
class Row:
    """One sequence to generate: a prompt (token ids) and its sampling. The engine fills in the rest."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Optional[Sink] = None
    """Called from the engine's thread with (text delta, finish_reason or None) as text becomes final."""
    cancelled: bool = False
    """Set from outside (a client went away): the row stops at the next step."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    """"length", "stop", "cancelled", or "error" (then ``error`` holds the exception)."""
    error: Optional[BaseException] = None
    t_first: Optional[float] = None
    """time.perf_counter() when the row's first token came (time to first token, in the server's metrics)."""
    t_done: Optional[float] = None
    """time.perf_counter() when the row ended."""
    # the row's own generator (``start_rows``); incremental detokenization (offsets into prompt_ids + token_ids)
    # and the text not yet released
    _gen: Any = None
    _keep: Any = None  # the special token ids this row's stop strings name (``RowStopper._kept``)
    _prefix: int = 0
    _read: int = 0
    _pending: str = ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def nucleus_probs(logits: Any, temperature: float, top_p: float) -> Any:
    """softmax(logits / T) (V,) cut to the top-p nucleus and renormalised: tokens in order of probability while
    the mass before them is below top_p (the most likely token always stays)."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return probs


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def sample_row(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """One token from ``logits`` (V,): the argmax below MIN_TEMPERATURE, else a draw from ``nucleus_probs``."""
    import torch

    if is_greedy(temperature):
        return int(torch.argmax(logits))
    return int(torch.multinomial(nucleus_probs(logits, temperature, top_p), 1, generator=generator))


def fail_row(r: Row, error: BaseException) -> None:
    """End ``r`` alone: finish_reason "error", nothing more released (its sink hears the end)."""
    log.warning("a row failed and ends alone: %s: %s", type(error).__name__, error)
    r.error, r.finish_reason, r._pending, r.t_done = error, "error", "", time.perf_counter()
    if r.sink is not None:
        try:
            r.sink("", "error")
        except Exception:  # noqa: BLE001 - the sink may be what failed; the row has ended either way
            log.warning("the failed row's sink failed too", exc_info=True)


def start_rows(rows: list[Row], device: Any) -> None:
    """Ready rows for decoding: each its own ``torch.Generator`` on ``device`` (seeded with ``params.seed``, or
    from os.urandom) and its detokenization offsets. A seed the generator refuses ends that row alone."""
    import torch

    for r in rows:
        r._prefix, r._read = max(len(r.prompt_ids) - _PREFIX_TOKENS, 0), len(r.prompt_ids)
        r._gen = torch.Generator(device=device)
        seed = r.params.seed if r.params.seed is not None else int.from_bytes(os.urandom(8), "little")
        try:
            r._gen.manual_seed(seed % SEED_MODULUS)
        except Exception as e:  # noqa: BLE001 - this row ends; the others go on
            fail_row(r, e)


def argmax_rows(logits: Any) -> list[int]:
    """The index of each row's largest logit (B, V) -> B ints, the first one on ties (as torch.argmax). On CPU
    through numpy, whose argmax is about 8x faster than torch's here (0.26 vs 2.0 ms for 32 x 49,152 floats on one
    thread, a tenth of a decode step of benchmarks/serve.py's student)."""
    import numpy as np
    import torch

    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return np.argmax(logits.numpy(), axis=-1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def pick_tokens(rows: list[Row], logits: Any) -> list[Optional[int]]:
    """Each row's next token from ``logits`` (B, V): the argmax for greedy rows (one argmax for the batch), a draw
    with the row's own generator for the others; None for rows that are done or fail here (``fail_row``)."""
    greedy = argmax_rows(logits) if any(is_greedy(r.params.temperature) for r in rows) else []
    out: list[Optional[int]] = []
    for i, r in enumerate(rows):
        if r.done:
            out.append(None)
        elif is_greedy(r.params.temperature):
            out.append(greedy[i])
        else:
            try:
                out.append(sample_row(logits[i], r.params.temperature, r.params.top_p, r._gen))
            except Exception as e:  # noqa: BLE001 - e.g. NaN logits: this row ends; the others go on
                fail_row(r, e)
                out.append(None)
    return out


class RowSampler:
    """Logits processor for ``generate``: each row drawn with its own params and generator (``start_rows``); the
    draw becomes the argmax."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: Any, scores: Any) -> Any:  # (B, T), (B, V) -> (B, V)
        out = None
        for i, r in enumerate(self.rows):
            if is_greedy(r.params.temperature) or r.done:
                continue  # greedy rows (and finished ones) keep their scores: generate takes the argmax
            try:
                tok = sample_row(scores[i], r.params.temperature, r.params.top_p, r._gen)
            except Exception as e:  # noqa: BLE001 - e.g. NaN logits: this row ends; the others go on
                fail_row(r, e)
                continue
            if out is None:
                out = scores.clone()
            out[i].fill_(-float("inf"))
            out[i, tok] = 0.0
        return scores if out is None else out


class RowStopper:
    """Stopping criterion: per-row max_tokens / EOS / stop strings / cancellation, and the text deltas."""

    def __init__(self, rows: list[Row], tokenizer: Any, eos_ids: set[int]):
        self.rows, self.tok, self.eos = rows, tokenizer, eos_ids
        self._special: Optional[dict[int, str]] = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:  # (B, T) -> (B,) bool
        import torch

        new = input_ids[:, -1].tolist()
        done = []
        for r, t in zip(self.rows, new):
            if not r.done:
                try:
                    self.step(r, int(t))
                except Exception as e:  # noqa: BLE001 - a decode or sink error ends this row only
                    fail_row(r, e)
            done.append(r.done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def special_tokens(self) -> dict[int, str]:
        """The tokenizer's special tokens, id -> text (its special ids and every added token marked special)."""
        if self._special is None:
            ids = set(getattr(self.tok, "all_special_ids", None) or [])
            for i, t in (getattr(self.tok, "added_tokens_decoder", None) or {}).items():
                if getattr(t, "special", False):
                    ids.add(int(i))
            self._special = {i: str(self.tok.convert_ids_to_tokens(i)) for i in ids}
        return self._special

    def _kept(self, r: Row) -> frozenset:
        """The special tokens that appear in one of ``r``'s stop strings (``"<|im_end|>"``): the row's text keeps
        them, so that the stop string matches (and the text is cut before it); every other special token is
        skipped, as vLLM's default ``skip_special_tokens`` does."""
        if r._keep is None:
            r._keep = frozenset(i for i, text in self.special_tokens().items()
                                if text and any(text in s for s in r.params.stop)) if r.params.stop else frozenset()
        return r._keep

    def _decode(self, r: Row, ids: list[int]) -> str:
        keep = self._kept(r)
        if not keep:
            return self.tok.decode(ids, skip_special_tokens=True)
        special = self.special_tokens()
        return self.tok.decode([t for t in ids if t in keep or t not in special], skip_special_tokens=False)

    def step(self, r: Row, token: int) -> None:
        """Append ``token`` to ``r``, release the text it completes, and end the row where it should end."""
        if r.cancelled:
            self.finish(r, "cancelled", flush=False)
            return
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.token_ids.append(token)
        if token in self.eos and not r.params.ignore_eos:
            self.finish(r, "stop")
            return
        ids = r.prompt_ids + r.token_ids
        before = self._decode(r, ids[r._prefix:r._read])
        now = self._decode(r, ids[r._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # else: wait for the rest of a UTF-8 character
            r._pending += now[len(before):]
            r._prefix, r._read = r._read, len(ids)
        if self._cut_at_stop(r):
            self.finish(r, "stop", flush=False)
        elif len(r.token_ids) >= r.params.max_tokens:
            self.finish(r, "length")
        else:  # release what cannot be the start of a stop string
            self._emit(r, r._pending[: len(r._pending) - self._hold(r)])

    @staticmethod
    def _hold(r: Row) -> int:
        """Length of the longest end of the pending text that begins a stop string (it may yet become one).
        Only ends up to the pending text's length are tried, and the pending text is what this step decoded plus
        what was held before (shorter than the longest stop string, which ``limits.max_stop_chars`` bounds): a
        step costs O(len(pending)^2) per stop string, not O(len(stop)^2) whatever was decoded."""
        p = r._pending
        for k in range(min(max((len(s) for s in r.params.stop), default=1) - 1, len(p)), 0, -1):
            tail = p[len(p) - k:]
            if any(len(s) > k and s.startswith(tail) for s in r.params.stop):
                return k
        return 0

    def _cut_at_stop(self, r: Row) -> bool:
        hits = [i for i in (r._pending.find(s) for s in r.params.stop) if i >= 0]
        if hits:
            r._pending = r._pending[: min(hits)]
        return bool(hits)

    def _emit(self, r: Row, delta: str, finish: Optional[str] = None) -> None:
        r._pending = r._pending[len(delta):]
        r.text += delta
        r.finish_reason = finish
        if finish is not None:
            r.t_done = time.perf_counter()
        if r.sink is not None and (delta or finish is not None):
            r.sink(delta, finish)

    def finish(self, r: Row, reason: str, flush: bool = True) -> None:
        """End the row; ``flush``: first release every token still undecoded (a split UTF-8 character included)."""
        if flush:
            ids = r.prompt_ids + r.token_ids  # EOS is a special token: decoding skips it (unless a stop string has it)
            r._pending += self._decode(r, ids[r._prefix:])[len(self._decode(r, ids[r._prefix:r._read])):]
            r._prefix = r._read = len(ids)
            if self._cut_at_stop(r):
                reason = "stop"
        self._emit(r, r._pending, reason)


def model_context(config: Any) -> Optional[int]:
    """The positions a model can attend over (prompt + completion), from its config as vLLM derives its
    max_model_len: the smallest of the length fields it has (``max_position_embeddings``, GPT-2's ``n_positions``,
    ...); None for a model with none of them (a pure SSM such as Mamba-2: its state has no length limit)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = [getattr(text, k, None) for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                                              "max_sequence_length", "max_seq_length", "seq_len")]
    found = [int(v) for v in found if isinstance(v, int) and v > 0]
    return min(found) if found else None


def context_groups(rows: list[Row], context: Optional[int]) -> list[list[Row]]:
    """``rows`` in groups that may generate together (one ``generate`` call each) without any row's positions
    passing the model's ``context``. ``generate`` runs every row of a batch for the batch's largest ``max_tokens``
    (an ended row is still fed, its attention mask extended), so a row's last position is its own prompt plus the
    group's largest ``max_tokens``, not its own: each group keeps that within ``context``. Every row fits alone
    (the server checks prompt + ``max_tokens`` against the context before a request joins a batch)."""
    if context is None or not rows:
        return [rows] if rows else []
    groups: list[list[Row]] = []
    for r in sorted(rows, key=lambda r: -r.params.max_tokens):  # a group's first row has its largest max_tokens
        home = next((g for g in groups if len(r.prompt_ids) + g[0].params.max_tokens <= context), None)
        if home is None:
            groups.append([r])
        else:
            home.append(r)
    return groups


class Engine:
    """A loaded causal LM + tokenizer that generates for batches of rows (see the module doc)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self.context = model_context(model.config)  # prompt + completion, per sequence (None: no limit)
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos + [tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)

    @classmethod
    def load(cls, reference: str, device: str = "auto", dtype: Optional[str] = None) -> "Engine":
        """Load ``reference`` (a save_pretrained dir, GGUF file, hub id: ``app.models``) on ``device`` (auto: CUDA
        when this process sees a GPU) in ``dtype`` (None: bf16 on CUDA, fp32 on CPU)."""
        import torch

        from app.models import load_causal_lm

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_causal_lm(reference, device=device, dtype=getattr(torch, dtype) if dtype else None)
        return cls(loaded.model, loaded.tokenizer)

    # -- prompts

    def encode(self, text: str) -> list[int]:
        """A completion prompt as the model's tokenizer encodes it by default (BOS where the tokenizer adds it)."""
        return list(self.tok(text)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Chat messages through the tokenizer's chat template, with the assistant's turn opened."""
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    # -- generation

    def start(self, rows: list[Row]) -> None:
        """Ready rows for decoding (``start_rows``): both schedulers call this before a row's first token."""
        start_rows(rows, self.device)

    def run(self, rows: list[Row]) -> list[Row]:
        """Generate every row (in place; also returned). Rows may differ in prompt, length and sampling; rows that
        cannot share a ``generate`` call within the model's context run in calls of their own (``context_groups``)."""
        for group in context_groups(rows, self.context):
            self._generate(group)
        return rows

    def _generate(self, rows: list[Row]) -> None:
        """One ``generate`` call for ``rows`` (left-padded together)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from app.caches import generation_cache

        longest = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            if r.prompt_ids:
                ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                mask[i, longest - len(r.prompt_ids):] = 1
        self.start(rows)
        stopper = RowStopper(rows, self.tok, self.eos_ids)
        # eos_token_id []: EOS is RowStopper's (per row, ignore_eos); None would bring back the model's own
        gc = GenerationConfig(max_new_tokens=max(r.params.max_tokens for r in rows), do_sample=False,
                              pad_token_id=self.pad_id, eos_token_id=[], use_cache=True)
        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=gc, cache=generation_cache(self.model),
                                logits_processor=LogitsProcessorList([RowSampler(rows)]),
                                stopping_criteria=StoppingCriteriaList([stopper]))
        for r in rows:  # generate ended (every row stopped, or its own limit): nothing stays open
            if not r.done:
                stopper.finish(r, "cancelled" if r.cancelled else "length")
