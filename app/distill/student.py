"""The student: a transformers ``Mamba2ForCausalLM`` derived from a teacher causal LM.

Same tokenizer and vocabulary, hidden size and layer count as the teacher; the SSM shape (heads, head size,
state size, groups, expand) is configurable and defaults to the one that lets ``init.attention_init`` copy
the teacher's attention projections: expand 1, one SSM head per attention head, head size = the teacher's
head_dim, state size = head_dim, one B/C group per head. It is a plain HF model: ``save_pretrained`` writes
config + safetensors, vLLM and ``from_pretrained`` read it back, and on CUDA with ``mamba-ssm`` and
``causal-conv1d`` installed transformers runs it on their kernels (the torch path otherwise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass
class StudentShape:
    """The SSM shape of the student; ``None`` means "as the teacher's attention" (see the module doc)."""

    num_heads: Optional[int] = None
    head_dim: Optional[int] = None
    state_size: Optional[int] = None
    n_groups: Optional[int] = None
    expand: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64


def teacher_dims(cfg: Any) -> dict:
    """hidden, layers, heads, kv_heads, head_dim, vocab of a Llama-style teacher config."""
    heads = cfg.num_attention_heads
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, "vocab": cfg.vocab_size}


def student_config(teacher_cfg: Any, shape: StudentShape):
    """The Mamba2Config of the student of ``teacher_cfg``; a shape that cannot work is a ValueError."""
    from transformers import Mamba2Config

    t = teacher_dims(teacher_cfg)
    heads = shape.num_heads or t["heads"]
    head_dim = shape.head_dim or (shape.expand * t["hidden"]) // heads
    if heads * head_dim != shape.expand * t["hidden"]:
        raise ValueError(f"student shape: num_heads * head_dim ({heads} * {head_dim}) must equal expand * hidden "
                         f"({shape.expand} * {t['hidden']})")
    groups = shape.n_groups or heads
    if heads % groups:
        raise ValueError(f"student shape: num_heads ({heads}) must be a multiple of n_groups ({groups})")
    ids = {k: getattr(teacher_cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return Mamba2Config(
        vocab_size=t["vocab"], hidden_size=t["hidden"], num_hidden_layers=t["layers"], num_heads=heads,
        head_dim=head_dim, state_size=shape.state_size or t["head_dim"], n_groups=groups, expand=shape.expand,
        conv_kernel=shape.conv_kernel, chunk_size=shape.chunk_size,
        layer_norm_epsilon=getattr(teacher_cfg, "rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(getattr(teacher_cfg, "tie_word_embeddings", False)), **ids)


def build_student(teacher, shape: StudentShape, init: str = "attention", seed: int = 0):
    """A Mamba2ForCausalLM for ``teacher`` (a loaded HF causal LM), fp32, initialised ``attention`` (weights
    copied from the teacher where the shapes allow, see ``init.py``) or ``random``. Returns (model, mapped):
    ``mapped`` lists what the attention init copied."""
    import torch
    from transformers import Mamba2ForCausalLM

    from app.distill.init import attention_init

    if init not in ("attention", "random"):
        raise ValueError(f"init must be attention or random, got {init!r}")
    cfg = student_config(teacher.config, shape)
    torch.manual_seed(seed)
    student = Mamba2ForCausalLM(cfg).float()
    mapped: list[str] = []
    if init == "attention":
        mapped = attention_init(student, teacher)
        log.info("attention init: %d tensors copied from the teacher", len(mapped))
    return student, mapped
