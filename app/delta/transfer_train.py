"""The LoRA fit of a function-space delta: B + LoRA learns A's log-likelihood ratio on aligned spans.

Per training span s (bytes both tokenizers cover exactly; ``spans.py``):

    target(s) = β · (ℓ_A1(s) − ℓ_A0(s))            A's change, cached by the span-score pass
    Δℓ_B(s)   = ℓ_{B+LoRA}(s) − ℓ_B(s)              both in the same forward path (the adapter switched off for
                                                   ℓ_B), B in eval mode: 0 exactly before the first step
    L_delta   = mean_s (Δℓ_B(s) − target(s))²
    L_retain  = mean over retain tokens t of KL(p_B(·|t) ‖ p_{B+LoRA}(·|t))   (the adapter switched off for p_B)
    L         = L_delta + λ · L_retain

The placebo is the same fit with the targets permuted among training spans of about the same length (same
mean and spread per length, no link to the span): what it recovers is what the text alone teaches B, not the
delta.

The windows are read from the span cache where the fit runs, in Arrow record batches, and kept columnar
(``FitRows``): nothing per token passes through the driver or becomes a Python object.

Runs as a Ray task (``num_gpus`` on a cluster); needs only B and the cached windows.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FitRows:
    """Windows of one role on B's side, columnar (Arrow's layout, in numpy): every window's tokens one after
    another, and every window's spans one after another, with per-window offsets. No Python object per token.

    Window w: tokens ``ids[tok_off[w]:tok_off[w+1]]`` (B's ids), ``spans[...]`` the span (from 0 in the window)
    of each token; spans ``span_off[w]:span_off[w+1]`` of the per-span arrays."""

    ids: np.ndarray  # (T,) int32
    spans: np.ndarray  # (T,) int32
    tok_off: np.ndarray  # (W+1,) int64
    span_off: np.ndarray  # (W+1,) int64
    span_bytes: np.ndarray  # (S,) int64
    scores: dict = field(default_factory=dict)  # model name -> (S,) float64 ℓ per span (a0, a1, b)
    target: Optional[np.ndarray] = None  # (S,) β·Δℓ_A (training rows)

    def __len__(self) -> int:
        return len(self.tok_off) - 1

    def window_ids(self, w: int) -> np.ndarray:
        return self.ids[self.tok_off[w]:self.tok_off[w + 1]]

    def window_spans(self, w: int) -> np.ndarray:
        return self.spans[self.tok_off[w]:self.tok_off[w + 1]]

    def n_spans(self, w: int) -> int:
        return int(self.span_off[w + 1] - self.span_off[w])

    def per_window(self, flat: np.ndarray) -> list:
        """A per-span array cut into per-window views."""
        return np.split(flat, self.span_off[1:-1]) if len(self) else []

    def batch(self, idx: Sequence[int], flat: np.ndarray) -> np.ndarray:
        """The per-span values of windows ``idx``, in that order."""
        return np.concatenate([flat[self.span_off[w]:self.span_off[w + 1]] for w in idx])


def _flat(col) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list column (an Arrow array or chunked array) without Python lists."""
    import pyarrow.compute as pc

    return (pc.list_flatten(col).to_numpy(zero_copy_only=False),
            pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64))


def read_rows(cache: str, role: str, *, scores: Sequence[str] = ("a0", "a1", "b"), tokens: bool = True,
              beta: Optional[float] = None, batch_rows: int = 4096) -> FitRows:
    """The scored windows of ``role`` from a span cache, streamed from its Parquet files in Arrow record batches
    and kept columnar. ``scores``: the ℓ columns to keep (those present); ``tokens``: keep B's ids and spans;
    ``beta``: also the training target β·(ℓ_A1 − ℓ_A0)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ds = pads.dataset(os.path.join(cache, "windows"), format="parquet")
    names = set(ds.schema.names)
    want = [f"l_{s}" for s in scores if f"l_{s}" in names]
    cols = ["span_bytes", *want, *(["ids_b", "span_b"] if tokens else [])]
    parts: dict[str, list] = {c: [] for c in cols}
    tok_len, span_len = [], []
    flt = (pc.field("role") == role) & (pc.field("n_spans") > 0)
    for rb in ds.to_batches(columns=cols, filter=flt, batch_size=batch_rows):
        for c in cols:
            values, lengths = _flat(rb.column(c))
            parts[c].append(values)
            if c == "span_bytes":
                span_len.append(lengths)
            elif c == "ids_b":
                tok_len.append(lengths)

    def cat(c, dtype):
        return np.concatenate(parts[c]).astype(dtype, copy=False) if parts.get(c) else np.zeros(0, dtype)

    n_span = np.concatenate(span_len) if span_len else np.zeros(0, np.int64)
    n_tok = np.concatenate(tok_len) if tok_len else np.zeros(len(n_span), np.int64)
    rows = FitRows(ids=cat("ids_b", np.int32), spans=cat("span_b", np.int32),
                   tok_off=np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64),
                   span_off=np.concatenate([[0], np.cumsum(n_span)]).astype(np.int64),
                   span_bytes=cat("span_bytes", np.int64),
                   scores={c[2:]: cat(c, np.float64) for c in want})
    if beta is not None and {"a0", "a1"} <= rows.scores.keys():
        rows.target = beta * (rows.scores["a1"] - rows.scores["a0"])
    return rows


def permute_targets(targets: np.ndarray, lengths: np.ndarray, seed: int, *, stratum: int = 32) -> np.ndarray:
    """The placebo's targets: the same values permuted among spans of about the same length (bytes).

    Spans are sorted by length (ties in random order) and cut into strata of ``stratum`` consecutive spans (the
    last one merged into the one before when smaller); targets are permuted within each stratum. The placebo then
    keeps the link between a span's length and its target (longer spans move more) and loses only the link to
    the span itself."""
    n = len(targets)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n), lengths))  # by length, ties shuffled
    out = np.empty_like(targets)
    bounds = list(range(0, n, stratum)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < stratum:
        del bounds[-2]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        idx = order[lo:hi]
        out[idx] = targets[idx[rng.permutation(len(idx))]]
    return out


def _batches(lengths: list[int], batch_tokens: int, rng: np.random.Generator) -> list[list[int]]:
    """Random windows grouped so that a batch's padded size stays within batch_tokens."""
    order = rng.permutation(len(lengths))
    out, cur, longest = [], [], 0
    for i in order:
        L = lengths[i] + 1
        if cur and max(longest, L) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, L)
    if cur:
        out.append(cur)
    return out


def _kl_retain(model, ids: list, start_id: int, pad_id: int, chunk: int = 1024):
    """Mean per-token KL(p_B ‖ p_{B+LoRA}) over a batch of retain windows (the output layer in checkpointed
    chunks, as in ``token_logprobs``)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from app.delta.spanscore import batch_inputs, head_logprobs, predicting_hidden

    inner = model.get_base_model()
    x, m = batch_inputs(ids, start_id, pad_id, next(inner.parameters()).device)
    with torch.no_grad(), model.disable_adapter():
        h_ref, _ = predicting_hidden(inner, x, m)  # (N, H)
    h, _ = predicting_hidden(inner, x, m)

    def chunk_kl(hc, rc):
        with torch.no_grad():
            ref = head_logprobs(inner, rc)
        return (ref.exp() * (ref - head_logprobs(inner, hc))).sum()

    total = sum(checkpoint(chunk_kl, h[lo:lo + chunk], h_ref[lo:lo + chunk], use_reentrant=False)
                for lo in range(0, h.shape[0], chunk))
    return total / h.shape[0]


def _lists(rows: FitRows) -> tuple[list, list, list]:
    """Per-window (ids, spans, n_spans) of ``rows``: numpy views, for ``score_windows``."""
    n = len(rows)
    return ([rows.window_ids(w) for w in range(n)], [rows.window_spans(w) for w in range(n)],
            [rows.n_spans(w) for w in range(n)])


def fit_adapter(b_ref: str, train: FitRows, retain: Optional[FitRows], evals: dict[str, FitRows], out: str, *,
                rank: int, alpha: Optional[float], target_modules: Any, lr: float, steps: int, retain_weight: float,
                batch_tokens: int, seed: int, dtype: str = "float32", device: Optional[str] = None,
                warmup: float = 0.05, log_every: int = 25) -> dict:
    """Train B + LoRA on ``train`` (windows with ``target`` per span), save the adapter to ``out`` (PEFT format),
    and return the training curve and ℓ_{B+LoRA} per span of every eval set (per-window arrays).

    B is loaded in ``dtype`` (the dtype of every score the transfer compares; the LoRA weights stay fp32) and
    kept in eval mode: its dropout would make the scores matched against the targets noisy. ℓ_B of a training
    batch is computed in the same forward path with the adapter switched off, so Δℓ_B is exactly 0 at step 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.delta.spans import start_token
    from app.delta.spanscore import check_head_path, score_windows, span_sums, token_logprobs
    from app.models import load_causal_lm

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_causal_lm(b_ref, device=device, dtype=getattr(torch, dtype))
    tok = lm.tokenizer
    start_id, pad_id = start_token(tok), tok.pad_token_id if tok.pad_token_id is not None else 0
    check_head_path(lm.model, start_id, pad_id)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=target_modules,
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, cfg)  # LoRA weights in fp32 whatever B's dtype (PEFT's autocast_adapter_dtype)
    model.eval()  # dropout off in B: the fit trains only the LoRA weights and must see B's deterministic scores
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    lengths = np.diff(train.tok_off).tolist()
    r_lengths = np.diff(retain.tok_off).tolist() if retain is not None and len(retain) else []
    queue: list[list[int]] = []
    r_queue: list[list[int]] = []
    curve = []
    for step in range(steps):
        if not queue:
            queue = _batches(lengths, batch_tokens, rng)
        batch = queue.pop()
        ids = [train.window_ids(i) for i in batch]
        spans, n_spans = [train.window_spans(i) for i in batch], [train.n_spans(i) for i in batch]
        logp, _ = token_logprobs(model, ids, start_id, pad_id, grad=True)
        adapted = torch.cat(span_sums(logp, spans, n_spans))
        with torch.no_grad(), model.disable_adapter():
            base = torch.cat(span_sums(token_logprobs(model, ids, start_id, pad_id)[0], spans, n_spans))
        target = torch.as_tensor(train.batch(batch, train.target), dtype=adapted.dtype, device=adapted.device)
        l_delta = ((adapted - base) - target).pow(2).mean()
        loss = l_delta
        l_ret = torch.zeros(())
        if retain_weight and r_lengths:
            if not r_queue:
                r_queue = _batches(r_lengths, batch_tokens, rng)
            l_ret = _kl_retain(model, [retain.window_ids(i) for i in r_queue.pop()], start_id, pad_id)
            loss = loss + retain_weight * l_ret
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "delta_mse": float(l_delta), "retain_kl": float(l_ret), "lr": sched.get_last_lr()[0]})
            log.info("transfer fit step %d/%d: delta mse %.4f, retain KL %.5f", step + 1, steps, float(l_delta), float(l_ret))
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    scores = {name: score_windows(model, *_lists(rows), start_id, pad_id) for name, rows in evals.items()}
    return {"curve": curve, "scores": scores, "seconds": time.perf_counter() - t0}


def eval_sets(cache: str) -> dict[str, FitRows]:
    """The held-out windows an adapter is scored on: ``domain`` (and ``general`` when there is any)."""
    out = {"domain": read_rows(cache, "eval_domain", scores=())}
    general = read_rows(cache, "eval_general", scores=())
    if len(general):
        out["general"] = general
    return out


def fit_from_cache(b_ref: str, cache: str, out: str, *, beta: float, placebo_seed: Optional[int] = None,
                   **kwargs: Any) -> dict:
    """``fit_adapter`` on a span cache's windows, read where the fit runs (a Ray task): the transfer rows with
    their targets (``placebo_seed``: permuted within length strata, the placebo), the retain rows, the eval sets."""
    train = read_rows(cache, "transfer", scores=("a0", "a1"), beta=beta)
    if placebo_seed is not None:
        train.target = permute_targets(train.target, train.span_bytes, placebo_seed)
    retain = read_rows(cache, "retain", scores=())
    return fit_adapter(b_ref, train, retain, eval_sets(cache), out, **kwargs)
