"""The LoRA fit of a function-space delta: B + LoRA learns A's log-likelihood ratio on aligned spans.

Per training span s (bytes both tokenizers cover exactly; ``spans.py``):

    target(s) = β · (ℓ_A1(s) − ℓ_A0(s))            A's change, cached by the span-score pass
    Δℓ_B(s)   = ℓ_{B+LoRA}(s) − ℓ_B(s)              ℓ_B cached; ℓ_{B+LoRA} differentiable
    L_delta   = mean_s (Δℓ_B(s) − target(s))²
    L_retain  = mean over retain tokens t of KL(p_B(·|t) ‖ p_{B+LoRA}(·|t))   (the adapter switched off for p_B)
    L         = L_delta + λ · L_retain

The placebo is the same fit with the targets permuted across the training spans (same mean and spread, no
link to the span): what it recovers is what the text alone teaches B, not the delta.

Runs as a Ray task (``num_gpus`` on a cluster); needs only B and the cached windows.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FitRows:
    """Windows on B's side: token ids, span index per token, and per span values (float64 arrays)."""

    ids: list
    spans: list
    n_spans: list
    target: list  # β·Δℓ_A per span (training rows) or None
    base: list  # ℓ_B per span


def permute_targets(targets: list, seed: int) -> list:
    """The placebo's targets: the same values permuted across all spans, cut back into the windows' shapes."""
    flat = np.concatenate(targets) if targets else np.zeros(0)
    perm = np.random.default_rng(seed).permutation(len(flat))
    out, k = [], 0
    for t in targets:
        out.append(flat[perm[k:k + len(t)]])
        k += len(t)
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


def fit_adapter(b_ref: str, train: FitRows, retain_ids: list, evals: dict[str, FitRows], out: str, *, rank: int,
                alpha: Optional[float], target_modules: Any, lr: float, steps: int, retain_weight: float,
                batch_tokens: int, seed: int, device: Optional[str] = None, warmup: float = 0.05,
                log_every: int = 25) -> dict:
    """Train B + LoRA on (ids, spans, targets), save the adapter to ``out`` (PEFT format), and return the
    training curve and ℓ_{B+LoRA} per span of every eval set."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.delta.spans import start_token
    from app.delta.spanscore import score_windows, span_sums, token_logprobs
    from app.models import load_causal_lm

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_causal_lm(b_ref, device=device, dtype=torch.float32)
    tok = lm.tokenizer
    start_id, pad_id = start_token(tok), tok.pad_token_id if tok.pad_token_id is not None else 0
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=target_modules,
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    lengths = [len(x) for x in train.ids]
    r_lengths = [len(x) for x in retain_ids]
    queue: list[list[int]] = []
    r_queue: list[list[int]] = []
    curve = []
    model.train()
    for step in range(steps):
        if not queue:
            queue = _batches(lengths, batch_tokens, rng)
        batch = queue.pop()
        logp, _ = token_logprobs(model, [train.ids[i] for i in batch], start_id, pad_id, grad=True)
        adapted = torch.cat(span_sums(logp, [train.spans[i] for i in batch], [train.n_spans[i] for i in batch]))
        base = torch.as_tensor(np.concatenate([train.base[i] for i in batch]), dtype=torch.float32, device=adapted.device)
        target = torch.as_tensor(np.concatenate([train.target[i] for i in batch]), dtype=torch.float32,
                                 device=adapted.device)
        l_delta = ((adapted - base) - target).pow(2).mean()
        loss = l_delta
        l_ret = torch.zeros(())
        if retain_weight and retain_ids:
            if not r_queue:
                r_queue = _batches(r_lengths, batch_tokens, rng)
            l_ret = _kl_retain(model, [retain_ids[i] for i in r_queue.pop()], start_id, pad_id)
            loss = loss + retain_weight * l_ret
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            curve.append({"step": step, "delta_mse": float(l_delta), "retain_kl": float(l_ret), "lr": sched.get_last_lr()[0]})
            log.info("transfer fit step %d/%d: delta mse %.4f, retain KL %.5f", step + 1, steps, float(l_delta), float(l_ret))
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    scores = {name: score_windows(model, rows.ids, rows.spans, rows.n_spans, start_id, pad_id)
              for name, rows in evals.items()}
    return {"curve": curve, "scores": scores, "seconds": time.perf_counter() - t0}
