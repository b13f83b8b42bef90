"""Logits from a causal LM's final hidden states, through the model's own head path.

Scorers that never hold a whole batch's logits (the refine job's perplexity, distillation's KD targets) run the
body once and turn chunks of final hidden states into logits. Those logits must be the model's: many causal LMs
do more after ``lm_head`` than a matrix product (Granite divides by ``logits_scaling``, Cohere multiplies by
``logit_scale``, Gemma 2/3 soft-cap), so ``HeadLogits`` calls the model's own ``forward`` with its body standing
in for the given hidden states: whatever the class does after its body, it does here too. The head runs in fp32
by default whatever the model's dtype (a bf16 model's logits in fp32, as the losses compute them).
"""

from __future__ import annotations

import copy


class _Given:
    """Stands in for a model's body: returns the hidden states it was given, whatever it is called with."""

    def __init__(self, hidden):
        self.hidden = hidden

    def __call__(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Out

        return Out(last_hidden_state=self.hidden)  # the widest body output: every field the heads read


class HeadLogits:
    """(N, d) final hidden states -> (N, V) fp32 logits, through ``model``'s own forward (see the module doc)."""

    def __init__(self, model, fp32: bool = True):
        import torch

        self.model = model
        self.prefix = model.base_model_prefix
        self.fp32 = fp32
        head = model.get_output_embeddings()
        # an fp32 head of the same class (a bf16 teacher's logits in fp32); shared when the model is fp32 already,
        # or when the head keeps the model's dtype (fp32=False: logits in fp32 from a head in the model's dtype)
        self.head = head if not fp32 or head.weight.dtype == torch.float32 else copy.deepcopy(head).float()

    def __call__(self, hidden):
        import torch

        m = self.model
        modules = m._modules
        head_name = next((k for k, v in modules.items() if v is m.get_output_embeddings()), None)
        if head_name is None:
            raise ValueError(f"{type(m).__name__}: its output embedding is not a direct submodule")
        # for this call only: the body answers with ``hidden``, the head is self.head (nn.Module looks
        # submodules up in _modules; the model's own dict is put back whatever happens)
        given = _Given((hidden.float() if self.fp32 else hidden)[None])  # (1, N, d)
        object.__setattr__(m, "_modules", {**modules, self.prefix: given, head_name: self.head})
        try:
            with torch.no_grad():
                ids = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
                z = m(input_ids=ids, use_cache=False).logits[0]  # (N, V)
        finally:
            object.__setattr__(m, "_modules", modules)
        return z.float()
