"""The teacher as distillation reads it: its body's final hidden states, and logits from them through the model's
own head path.

Distillation never holds a whole batch's logits (``losses.kd_ce_loss`` walks the tokens in chunks), so it runs
the body once and turns chunks of final hidden states into logits. Those logits must be the model's: many
causal LMs do more after ``lm_head`` than a matrix product (Granite divides by ``logits_scaling``, Cohere
multiplies by ``logit_scale``, Gemma 2/3 soft-cap), so ``HeadLogits`` calls the model's own ``forward`` with its
body standing in for the given hidden states: whatever the class does after its body, it does here too. The head
runs in fp32 whatever the teacher's dtype (a bf16 teacher on GPU: its hidden states in bf16, logits in fp32, as
the KD loss computes them), so the KD targets are not rounded to bf16.
"""

from __future__ import annotations

import logging

from app.heads import HeadLogits  # noqa: F401 - distillation's teacher logits (re-exported for its importers)

log = logging.getLogger(__name__)


def body_hidden(model, input_ids):
    """(B, T, d) final (normed) hidden states of ``model``'s body for ``input_ids`` (B, T), no cache."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def nll_sum(head: HeadLogits, hidden, labels, chunk_tokens: int) -> float:
    """Summed next-token NLL of the teacher: ``hidden`` (B, T, d) its final hidden states, ``labels`` (B, T);
    logits ``chunk_tokens`` at a time through its head path."""
    import torch
    import torch.nn.functional as F

    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(y), chunk_tokens):
            total += float(F.cross_entropy(head(h[i:i + chunk_tokens]), y[i:i + chunk_tokens], reduction="sum"))
    return total
