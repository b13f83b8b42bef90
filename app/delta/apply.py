"""``delta apply``: a LoRA adapter onto a model (the base it came from, or another checkpoint of the same
architecture: base_v2 + (tuned_v1 - base_v1)), merged into an HF checkpoint or kept as an adapter.

PEFT's ``lora_bias`` is one switch for all targets; targets whose base layer has no bias carry a zero
``lora_B.bias``, which PEFT refuses to merge. ``apply`` checks those are zero and drops them first.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from app.delta.checkpoint import DeltaError
from app.delta.extract import META_FILE


def load_adapted(adapter: str, model_ref: str, *, dtype: Optional[str] = None, device: str = "cpu"):
    """(PeftModel of model_ref + adapter, tokenizer)."""
    import torch
    from peft import PeftModel

    from app.models import load_causal_lm

    lm = load_causal_lm(model_ref, device=device, dtype=getattr(torch, dtype) if dtype else torch.float32)
    meta_path = os.path.join(adapter, META_FILE)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    model = lm.model
    n = meta.get("resize_vocab")
    if n and model.get_input_embeddings().weight.shape[0] != n:
        model.resize_token_embeddings(n)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise DeltaError(f"{adapter}: no adapter_config.json (not a PEFT adapter directory)")
    peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    return peft_model, lm.tokenizer


def _drop_zero_biases(peft_model) -> None:
    import torch

    for name, mod in peft_model.named_modules():
        flags = getattr(mod, "lora_bias", None)
        if not isinstance(flags, dict):
            continue
        for adapter, on in list(flags.items()):
            base = mod.get_base_layer()
            if on and getattr(base, "bias", None) is None:
                b = mod.lora_B[adapter].bias
                if b is not None and bool(torch.any(b != 0)):
                    raise DeltaError(f"{name}: the adapter changes a bias the model's layer does not have")
                mod.lora_B[adapter].bias = None
                flags[adapter] = False


def apply(adapter: str, model_ref: str, out: str, *, merge: bool = True, dtype: Optional[str] = None) -> str:
    peft_model, tok = load_adapted(adapter, model_ref, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    if merge:
        _drop_zero_biases(peft_model)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(out)
    else:
        peft_model.save_pretrained(out)
        meta = os.path.join(adapter, META_FILE)
        if os.path.isfile(meta):
            with open(meta) as f, open(os.path.join(out, META_FILE), "w") as g:
                g.write(f.read())
    tok.save_pretrained(out)
    return out
