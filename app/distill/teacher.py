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

import copy
import logging

log = logging.getLogger(__name__)


def body_hidden(model, input_ids):
    """(B, T, d) final (normed) hidden states of ``model``'s body for ``input_ids`` (B, T), no cache."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


class _Given:
    """Stands in for a model's body: returns the hidden states it was given, whatever it is called with."""

    def __init__(self, hidden):
        self.hidden = hidden

    def __call__(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Out

        return Out(last_hidden_state=self.hidden)  # the widest body output: every field the heads read


class HeadLogits:
    """(N, d) final hidden states -> (N, V) fp32 logits, through ``model``'s own forward (see the module doc)."""

    def __init__(self, model):
        import torch

        self.model = model
        self.prefix = model.base_model_prefix
        head = model.get_output_embeddings()
        # an fp32 head of the same class (a bf16 teacher's logits in fp32); shared when the model is fp32 already
        self.head = head if head.weight.dtype == torch.float32 else copy.deepcopy(head).float()

    def __call__(self, hidden):
        import torch

        m = self.model
        modules = m._modules
        head_name = next((k for k, v in modules.items() if v is m.get_output_embeddings()), None)
        if head_name is None:
            raise ValueError(f"{type(m).__name__}: its output embedding is not a direct submodule")
        # for this call only: the body answers with ``hidden``, the head is the fp32 one (nn.Module looks
        # submodules up in _modules; the model's own dict is put back whatever happens)
        object.__setattr__(m, "_modules", {**modules, self.prefix: _Given(hidden.float()[None]),  # (1, N, d)
                                           head_name: self.head})
        try:
            with torch.no_grad():
                ids = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
                z = m(input_ids=ids, use_cache=False).logits[0]  # (N, V)
        finally:
            object.__setattr__(m, "_modules", modules)
        return z.float()


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
