"""Distillation losses, each with a slow, obvious reference (``*_ref``) that the tests compare against on
values and gradients.

Stages (``train.py`` runs them in order, each for a budget of tokens):
    align   per layer, the student's mixer gets the teacher's input to that layer (through the student's
            block norm) and matches the teacher's attention output: MSE normalised per token
    kd      forward KL(teacher || student) of the temperature-T distributions, times T^2, mean over real
            tokens, plus alpha * cross-entropy on the next token
    ce      cross-entropy only

A stage's terms are combined with fixed weights or, with ``stages.weighting: auto``, by ``uncertainty_weighted``
(Kendall, Gal & Cipolla 2018): sum_i exp(-s_i) L_i + s_i, the log-variances s_i learned with the student, so a
term's weight settles where its loss is small relative to its noise, and no weight is searched by hand.

Logits are never held for a whole batch: ``kd_ce_loss`` walks the real tokens in chunks and recomputes each
chunk's logits in the backward pass (activation checkpointing), so memory is O(chunk x vocab), not
O(batch x seq x vocab) (49k vocab x 8 x 2048 tokens in fp32 would be 3.2 GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def align_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over real tokens of ||s - t||^2 / (||t||^2 + eps): the squared error relative to the teacher's
    output at that token. student_out, teacher_out: (B, T, d); mask: (B, T), true for real tokens."""
    m = mask.to(student_out.dtype)  # (B, T)
    s, t = student_out.float(), teacher_out.float()
    per_tok = (s - t).pow(2).sum(-1) / (t.pow(2).sum(-1) + eps)  # (B, T)
    return (per_tok * m).sum() / m.sum().clamp_min(1)


def align_loss_ref(student_out, teacher_out, mask, eps: float = 1e-6):
    total, n = 0.0, 0
    for b in range(student_out.shape[0]):
        for i in range(student_out.shape[1]):
            if mask[b, i]:
                s, t = student_out[b, i].float(), teacher_out[b, i].float()
                total = total + ((s - t) ** 2).sum() / ((t ** 2).sum() + eps)
                n += 1
    return total / max(n, 1)


def uncertainty_weighted(terms: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """sum_i exp(-s_i) L_i + s_i. terms: (n,) the stage's losses; log_vars: (n,) learned s_i."""
    return (torch.exp(-log_vars) * terms + log_vars).sum()


def uncertainty_weighted_ref(terms, log_vars):
    total = 0.0
    for loss, s in zip(terms, log_vars):
        total = total + loss / torch.exp(s) + s
    return total


@dataclass
class TeacherTopK:
    """Cached teacher logits: the top-k token ids and their logits per position, (B, T, k) each."""

    ids: torch.Tensor
    logits: torch.Tensor


def _chunk_losses(h_s, w_s, t_part, labels, temperature: float, topk: bool):
    """Summed KD and CE over one chunk of N tokens. h_s: (N, d); w_s: (V, d); t_part: teacher logits (N, V),
    (ids (N, k), logits (N, k)), or None (CE only); labels: (N,) with IGNORE where there is no next token."""
    z_s = (h_s.float() @ w_s.float().T)  # (N, V) fp32
    ce = F.cross_entropy(z_s, labels, ignore_index=IGNORE, reduction="sum")
    if t_part is None:
        return ce.new_zeros(()), ce
    log_q = F.log_softmax(z_s / temperature, dim=-1)  # (N, V)
    if topk:
        ids, z_t = t_part
        log_p = F.log_softmax(z_t.float() / temperature, dim=-1)  # (N, k): renormalised over the top k
        log_q = log_q.gather(1, ids.long())  # (N, k)
    else:
        log_p = F.log_softmax(t_part.float() / temperature, dim=-1)  # (N, V)
    kd = (log_p.exp() * (log_p - log_q)).sum() * temperature ** 2
    return kd, ce


def teacher_logits(h, head) -> torch.Tensor:
    """(N, V) fp32 teacher logits of hidden states ``h`` (N, d): ``head`` is a callable (the model's own head path)
    or a weight (V, d)."""
    return head(h).float() if callable(head) else h.float() @ head.float().T


def kd_ce_loss(h_s: torch.Tensor, w_s: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *,
               teacher_hidden: Optional[torch.Tensor] = None, teacher_head: Optional[torch.Tensor] = None,
               teacher_topk: Optional[TeacherTopK] = None, temperature: float = 1.0,
               chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD, CE), each a mean over the real tokens (CE over those with a label); KD is 0 without a teacher.

    h_s: the student's final hidden states (B, T, d), w_s its output embedding (V, d). The teacher is either
    dense, ``teacher_hidden`` (B, T, d_t) and ``teacher_head`` (its output embedding (V, d_t), or a callable
    (N, d_t) -> (N, V) logits such as ``teacher.HeadLogits``, the model's own head path), or ``teacher_topk``.
    mask (B, T) marks real tokens; labels (B, T) hold the next token or IGNORE.
    """
    flat = mask.reshape(-1).nonzero().squeeze(1)  # (M,) real token positions
    n_real = max(int(flat.numel()), 1)
    n_lab = max(int((labels.reshape(-1)[flat] != IGNORE).sum()), 1)
    hs = h_s.reshape(-1, h_s.shape[-1])
    lab = labels.reshape(-1)
    kd_sum = h_s.new_zeros((), dtype=torch.float32)
    ce_sum = h_s.new_zeros((), dtype=torch.float32)
    topk = teacher_topk is not None
    dense = teacher_hidden is not None
    if topk and dense:
        raise ValueError("give the teacher as hidden states + head or as top-k logits, not both")
    for start in range(0, int(flat.numel()), chunk_tokens):
        idx = flat[start:start + chunk_tokens]
        with torch.no_grad():
            if not (topk or dense):  # CE only
                t_part = None
            elif topk:
                t_part = (teacher_topk.ids.reshape(-1, teacher_topk.ids.shape[-1])[idx],
                          teacher_topk.logits.reshape(-1, teacher_topk.logits.shape[-1])[idx])
            else:
                th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[idx]
                t_part = teacher_logits(th, teacher_head)  # (N, V), freed after the chunk
        if topk:
            fn, args = (lambda h, w, a, b, lb: _chunk_losses(h, w, (a, b), lb, temperature, True)), (*t_part, lab[idx])
        elif dense:
            fn, args = (lambda h, w, z, lb: _chunk_losses(h, w, z, lb, temperature, False)), (t_part, lab[idx])
        else:
            fn, args = (lambda h, w, lb: _chunk_losses(h, w, None, lb, temperature, False)), (lab[idx],)
        if torch.is_grad_enabled() and (hs.requires_grad or w_s.requires_grad):
            kd, ce = checkpoint(fn, hs[idx], w_s, *args, use_reentrant=False)
        else:
            kd, ce = fn(hs[idx], w_s, *args)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
    return kd_sum / n_real, ce_sum / n_lab


def kd_ce_loss_ref(h_s, w_s, mask, labels, *, teacher_hidden=None, teacher_head=None, teacher_topk=None,
                   temperature: float = 1.0):
    """Full logits at once, torch's own KL and cross-entropy."""
    z_s = h_s.float() @ w_s.float().T  # (B, T, V)
    m = mask.bool()
    log_q = F.log_softmax(z_s / temperature, -1)[m]  # (M, V)
    if teacher_topk is not None:
        log_p = F.log_softmax(teacher_topk.logits.float() / temperature, -1)[m]
        log_q = log_q.gather(1, teacher_topk.ids[m].long())
    else:
        th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        z_t = teacher_logits(th, teacher_head).reshape(*teacher_hidden.shape[:-1], -1)  # (B, T, V)
        log_p = F.log_softmax(z_t / temperature, -1)[m]
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="sum") * temperature ** 2 / max(int(m.sum()), 1)
    lab = labels.masked_fill(~m, IGNORE)
    ce = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), lab.reshape(-1), ignore_index=IGNORE)
    return kd, ce
