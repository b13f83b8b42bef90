"""The student: a transformers ``Mamba2ForCausalLM`` derived from a teacher causal LM.

Same tokenizer and vocabulary as the teacher; hidden size and layer count are the teacher's unless given (a
smaller student, e.g. for scaling sweeps, is randomly initialised). The SSM shape (heads, head size,
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
    """The student's shape; ``None`` means "as the teacher's" (see the module doc)."""

    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
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
    hidden, layers = shape.hidden_size or t["hidden"], shape.num_layers or t["layers"]
    if shape.num_heads:
        heads = shape.num_heads
    elif shape.head_dim:
        heads = max(1, (shape.expand * hidden) // shape.head_dim)
    else:
        heads = t["heads"]
    head_dim = shape.head_dim or (shape.expand * hidden) // heads
    if heads * head_dim != shape.expand * hidden:
        raise ValueError(f"student shape: num_heads * head_dim ({heads} * {head_dim}) must equal expand * hidden "
                         f"({shape.expand} * {hidden})")
    groups = shape.n_groups or heads
    if heads % groups:
        raise ValueError(f"student shape: num_heads ({heads}) must be a multiple of n_groups ({groups})")
    ids = {k: getattr(teacher_cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return Mamba2Config(
        vocab_size=t["vocab"], hidden_size=hidden, num_hidden_layers=layers, num_heads=heads,
        head_dim=head_dim, state_size=shape.state_size or t["head_dim"], n_groups=groups, expand=shape.expand,
        conv_kernel=shape.conv_kernel, chunk_size=shape.chunk_size,
        layer_norm_epsilon=getattr(teacher_cfg, "rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(getattr(teacher_cfg, "tie_word_embeddings", False)), **ids)


def build_student(teacher, shape: StudentShape, init: str = "attention", seed: int = 0):
    """A Mamba2ForCausalLM for ``teacher`` (a loaded HF causal LM; for ``random``, its config is enough), fp32,
    initialised ``attention`` (weights copied from the teacher where the shapes allow, see ``init.py``) or
    ``random``. Returns (model, mapped): ``mapped`` lists what the attention init copied."""
    import torch
    from transformers import Mamba2ForCausalLM

    from app.distill.init import attention_init

    if init not in ("attention", "random"):
        raise ValueError(f"init must be attention or random, got {init!r}")
    teacher_cfg = getattr(teacher, "config", teacher)
    if init == "attention" and teacher_cfg is teacher:
        raise ValueError("the attention init copies the teacher's weights: pass the loaded teacher, not its config")
    if init == "attention" and (shape.hidden_size or shape.num_layers):
        t = teacher_dims(teacher_cfg)
        if (shape.hidden_size or t["hidden"], shape.num_layers or t["layers"]) != (t["hidden"], t["layers"]):
            raise ValueError("the attention init needs the teacher's hidden size and layer count (use init random)")
    cfg = student_config(teacher_cfg, shape)
    torch.manual_seed(seed)
    student = Mamba2ForCausalLM(cfg).float()
    mapped: list[str] = []
    if init == "attention":
        mapped = attention_init(student, teacher)
        log.info("attention init: %d tensors copied from the teacher", len(mapped))
    return student, mapped
