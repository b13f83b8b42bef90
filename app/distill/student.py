"""The student, built from a teacher causal LM: a hybrid Mamba-in-Llama (``hybrid``, transformers'
``BambaForCausalLM``) or a pure Mamba-2 (``mamba2``, ``Mamba2ForCausalLM``).

hybrid   per teacher layer: both RMSNorms and the SwiGLU MLP copied; the attention mixer kept verbatim (the
         layers in ``attention_layers``) or replaced by a Mamba-2 mixer (initialised from Q/K/V/O by
         ``init.py``, or at random). Embeddings, the final norm and the head copied. The kept attention layers
         use the teacher's RoPE exactly (``BambaConfig`` defaults to partial_rotary_factor 0.5; the teacher's
         rope parameters are passed with factor 1.0). With every attention layer kept the student *is* the
         teacher (a test checks the logits). SSM shape: expand 1, one SSM head per attention head, head size =
         state size = the teacher's head_dim, one B/C group per head, a bias on the mixers' in/out projections (the
         constant gate of ``init.py`` lives in it).
mamba2   blocks of norm + mixer, no MLP; the teacher's shape, or a smaller random one (scaling sweeps).

Both are plain HF models: ``save_pretrained`` writes config + safetensors, ``AutoModelForCausalLM.from_pretrained``
reads them back, vLLM has both architectures, and on CUDA with ``mamba-ssm`` and ``causal-conv1d`` installed
transformers runs them on their kernels (its torch path otherwise).

Generation with a cache: transformers 5.24 cannot generate from a Bamba model with *no* attention layer (its
causal-mask code asks the cache for its length, which only attention layers track). ``generation_cache(model)``
returns the cache to pass (``model.generate(..., cache=generation_cache(model))``, from ``app/caches.py``); for
such a model it is a ``DynamicCache`` that counts the tokens itself (``app/recurrent.py``). Students without attention
are saved with ``use_cache: false`` so that a plain forward does not build the default cache either, and with
``use_cache: true`` in their generation config, so that ``generate`` feeds one token per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Sequence, Union

from app.distill.init import copy_mismatch, mixer_from_attention, teacher_dims

log = logging.getLogger(__name__)

ARCHS = ("hybrid", "mamba2")
INITS = ("attention", "random")
# a teacher layer's parameters the hybrid copy knows (anything else, e.g. q_norm of Qwen3, would be lost)
_LAYER_PARAMS = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias",
                 "mlp.down_proj.bias", *(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias"))}
_LAYER_REQUIRED = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                   "mlp.up_proj.weight", "mlp.down_proj.weight", *(f"self_attn.{p}_proj.weight" for p in "qkvo")}
# teachers whose forward is the student's, module for module (the copy and the all-attention invariant hold)
CARRIED = ("llama", "mistral", "qwen2")
# known teachers with Llama-like parameter names and other math (model_type prefix -> what the copy would lose)
UNCARRIED = {
    "gemma": "its RMSNorm scales by (1 + w), its embeddings by sqrt(hidden_size), its MLP uses GELU (and Gemma 2/3 "
             "add norms and logit soft-capping)",
    "granite": "its embedding, residual and attention multipliers and its logits_scaling",
    "cohere": "its parallel attention + MLP block, LayerNorm and logit_scale",
    "olmo": "its norms after attention and MLP (and q/k norms)",
    "qwen3": "its q/k norms",
    "smollm3": "its layers without RoPE",
    "phi": "its fused projections and partial rotary",
}


@dataclass
class StudentShape:
    """The mamba2 student's shape; ``None`` means "as the teacher's" (see the module doc)."""

    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    head_dim: Optional[int] = None
    state_size: Optional[int] = None
    n_groups: Optional[int] = None
    expand: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64


def parse_attention_layers(spec: Union[float, str, Sequence[int], None]) -> Union[Fraction, list[int]]:
    """``student.attention_layers`` read: a Fraction in [0, 1] (from a number or a string such as "1/4"; None is
    0) or the sorted list of layer indices (each an int >= 0). ValueError says why ``spec`` is neither."""
    if spec is None:
        return Fraction(0)
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
            raise ValueError(f"a list must hold layer indices >= 0, got {list(spec)}")
        return sorted(set(spec))
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise ValueError(f"must be a fraction (0, 1/8, 1/4, 1/2, 1, ...) or a list of layer indices, got {spec!r}")
    try:
        f = Fraction(spec.strip()) if isinstance(spec, str) else Fraction(spec).limit_denominator(1000)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"cannot read {spec!r} as a fraction") from None
    if not 0 <= f <= 1:
        raise ValueError(f"a fraction must lie in [0, 1], got {spec}")
    return f


def attention_layer_indices(spec: Union[float, str, Sequence[int], None], num_layers: int) -> list[int]:
    """The teacher layers whose attention the hybrid keeps. ``spec`` (see ``parse_attention_layers``): a fraction f,
    evenly spaced as MambaInLlama places them: for f = 1/k, layers k-1, 2k-1, ... (1/4 of 30 layers keeps 3, 7, ...,
    27); otherwise round(f * L) layers at floor((j + 1) L / n) - 1. Or a list of layer indices below L."""
    try:
        f = parse_attention_layers(spec)
    except ValueError as e:
        raise ValueError(f"student.attention_layers: {e}") from None
    if isinstance(f, list):
        bad = [i for i in f if i >= num_layers]
        if bad:
            raise ValueError(f"student.attention_layers: {bad} outside 0..{num_layers - 1}")
        return f
    if f == 0:
        return []
    if f.numerator == 1:
        return list(range(f.denominator - 1, num_layers, f.denominator))
    n = max(1, round(float(f) * num_layers))
    return [(j + 1) * num_layers // n - 1 for j in range(n)]


def student_config(teacher_cfg: Any, shape: StudentShape):
    """The Mamba2Config of the mamba2 student of ``teacher_cfg``; a shape that cannot work is a ValueError."""
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


def hybrid_config(teacher_cfg: Any, attention_layers: Sequence[int], conv_kernel: int = 4, chunk_size: int = 64):
    """The BambaConfig of the hybrid student of a Llama-style ``teacher_cfg`` keeping ``attention_layers``."""
    from transformers import BambaConfig

    check_carried(teacher_cfg)
    t = teacher_dims(teacher_cfg)
    if t["heads"] * t["head_dim"] % t["hidden"]:
        raise ValueError(f"hybrid student: teacher heads * head_dim ({t['heads']} * {t['head_dim']}) must be a "
                         f"multiple of its hidden size ({t['hidden']})")
    if t["head_dim"] != t["hidden"] // t["heads"]:
        raise ValueError(f"hybrid student: the teacher's head_dim ({t['head_dim']}) must be hidden / heads "
                         f"({t['hidden']} / {t['heads']}), as BambaAttention assumes")
    rope = dict(getattr(teacher_cfg, "rope_parameters", None) or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": float(getattr(teacher_cfg, "rope_theta", 10000.0))}
    rope["partial_rotary_factor"] = 1.0  # BambaConfig would otherwise rotate half of each head
    q_bias = bool(getattr(teacher_cfg, "attention_bias", False)) or teacher_cfg.model_type in ("qwen2",)
    ids = {k: getattr(teacher_cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return BambaConfig(
        vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=teacher_cfg.intermediate_size,
        num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
        hidden_act=getattr(teacher_cfg, "hidden_act", "silu"), rms_norm_eps=getattr(teacher_cfg, "rms_norm_eps", 1e-5),
        max_position_embeddings=getattr(teacher_cfg, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(getattr(teacher_cfg, "tie_word_embeddings", False)),
        attn_layer_indices=list(attention_layers), attention_bias=q_bias,
        mlp_bias=bool(getattr(teacher_cfg, "mlp_bias", False)), rope_parameters=rope,
        mamba_n_heads=t["heads"], mamba_d_head=t["head_dim"], mamba_n_groups=t["heads"], mamba_d_state=t["head_dim"],
        mamba_expand=t["heads"] * t["head_dim"] // t["hidden"], mamba_d_conv=conv_kernel, mamba_chunk_size=chunk_size,
        mamba_conv_bias=True, mamba_proj_bias=True, use_cache=bool(attention_layers), **ids)


def check_carried(teacher_cfg: Any, what: str = "hybrid student") -> None:
    """Refuse a teacher whose math the copy cannot carry exactly: only the model types in ``CARRIED`` compute
    what the student's modules compute (w * RMSNorm(x), unscaled embeddings, attention scaled by
    1/sqrt(head_dim), plain residual adds, logits = lm_head(h)). Others may share the Llama parameter names and
    still differ (``UNCARRIED`` names why for the known ones); their student would be silently wrong."""
    mt = getattr(teacher_cfg, "model_type", None)
    if mt in CARRIED:
        window = getattr(teacher_cfg, "sliding_window", None) if getattr(teacher_cfg, "use_sliding_window", True) \
            else None
        if window is not None and window < getattr(teacher_cfg, "max_position_embeddings", 0):
            raise ValueError(f"{what}: the teacher ({mt}) attends within a sliding window of {window} tokens, which "
                             "the student's full-context attention and its copy do not carry")
        return
    family = next((k for k in UNCARRIED if mt and mt.startswith(k)), None)
    why = UNCARRIED[family] if family else "not one of the architectures the copy is known to carry exactly"
    raise ValueError(f"{what}: teacher model_type {mt!r} cannot be carried into the student ({why}); the copy "
                     f"carries {', '.join(sorted(CARRIED))} teachers (a mamba2 student with student.init: random "
                     "takes any teacher)")


def _check_llama_like(teacher) -> None:
    check_carried(teacher.config)
    for i, layer in enumerate(teacher.model.layers):
        names = {n for n, _ in layer.named_parameters()}
        extra, missing = sorted(names - _LAYER_PARAMS), sorted(_LAYER_REQUIRED - names)
        if extra or missing:
            raise ValueError(f"hybrid student: teacher layer {i} has parameters the copy does not carry: {extra}, "
                             f"lacks {missing} (a Llama-style teacher is needed: norms, q/k/v/o, SwiGLU MLP)")


def _copy(dst, src) -> None:
    import torch

    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(dst, "bias", None) is not None:
            if getattr(src, "bias", None) is not None:
                dst.bias.copy_(src.bias)
            else:
                dst.bias.zero_()


def build_hybrid(teacher, attention_layers: Sequence[int], init: str = "attention", conv_init: str = "identity",
                 seed: int = 0, conv_kernel: int = 4, chunk_size: int = 64):
    """A BambaForCausalLM student of a loaded Llama-style teacher (fp32; see the module doc). Returns
    (model, mapped): ``mapped`` lists the student tensors set from the teacher (or by the SSM init)."""
    import torch
    from transformers import BambaForCausalLM

    if init not in INITS:
        raise ValueError(f"student.init must be one of {INITS}, got {init!r}")
    _check_llama_like(teacher)
    cfg = hybrid_config(teacher.config, attention_layers, conv_kernel, chunk_size)
    cfg._attn_implementation = getattr(teacher.config, "_attn_implementation", None) or "sdpa"
    torch.manual_seed(seed)
    student = BambaForCausalLM(cfg).float()
    gen = torch.Generator().manual_seed(seed)
    dims = teacher_dims(teacher.config)
    tm, sm = teacher.model, student.model
    mapped = ["model.embed_tokens.weight", "model.final_layernorm.weight"]
    _copy(sm.embed_tokens, tm.embed_tokens)
    _copy(sm.final_layernorm, tm.norm)
    if not cfg.tie_word_embeddings:
        _copy(student.lm_head, teacher.lm_head)
        mapped.append("lm_head.weight")
    for i, (tl, sl) in enumerate(zip(tm.layers, sm.layers)):
        p = f"model.layers.{i}."
        _copy(sl.input_layernorm, tl.input_layernorm)
        _copy(sl.pre_ff_layernorm, tl.post_attention_layernorm)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy(getattr(sl.feed_forward, name), getattr(tl.mlp, name))
        mapped += [p + n for n in ("input_layernorm.weight", "pre_ff_layernorm.weight", "feed_forward")]
        if i in cfg.attn_layer_indices:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _copy(getattr(sl.self_attn, name), getattr(tl.self_attn, name))
            mapped.append(p + "self_attn")
        elif init == "attention":
            mapped += [p + "mamba." + n for n in mixer_from_attention(sl.mamba, tl.self_attn, dims, conv_init, gen,
                                                                      tl.input_layernorm.weight)]
    if cfg.tie_word_embeddings:
        student.tie_weights()
    student.generation_config.use_cache = True  # generate() keeps its cache even where a plain forward has none
    log.info("hybrid student: %d layers, attention kept in %s, mixer init %s", cfg.num_hidden_layers,
             cfg.attn_layer_indices, init)
    return student, mapped


def build_mamba2(teacher, shape: StudentShape, init: str = "attention", conv_init: str = "identity", seed: int = 0):
    """A Mamba2ForCausalLM for ``teacher`` (a loaded HF causal LM; for ``random``, its config is enough), fp32,
    initialised ``attention`` (embeddings, norms, head and, where the shapes allow, Q/K/V/O copied) or
    ``random``. Returns (model, mapped)."""
    import torch
    from transformers import Mamba2ForCausalLM

    if init not in INITS:
        raise ValueError(f"student.init must be one of {INITS}, got {init!r}")
    teacher_cfg = getattr(teacher, "config", teacher)
    if init == "attention" and teacher_cfg is teacher:
        raise ValueError("the attention init copies the teacher's weights: pass the loaded teacher, not its config")
    if init == "attention":  # it copies embeddings, norms and head: they must mean what the student's mean
        check_carried(teacher_cfg, "mamba2 student with init attention")
    t = teacher_dims(teacher_cfg)
    if init == "attention" and (shape.hidden_size or t["hidden"], shape.num_layers or t["layers"]) != (t["hidden"], t["layers"]):
        raise ValueError("the attention init needs the teacher's hidden size and layer count (use init random)")
    cfg = student_config(teacher_cfg, shape)
    torch.manual_seed(seed)
    student = Mamba2ForCausalLM(cfg).float()
    mapped: list[str] = []
    if init != "attention":
        return student, mapped
    gen = torch.Generator().manual_seed(seed)
    tm, sm = teacher.model, student.backbone
    _copy(sm.embeddings, tm.embed_tokens)
    _copy(sm.norm_f, tm.norm)
    mapped += ["backbone.embeddings.weight", "backbone.norm_f.weight"]
    if not cfg.tie_word_embeddings:
        _copy(student.lm_head, teacher.lm_head)
        mapped.append("lm_head.weight")
    why = copy_mismatch(sm.layers[0].mixer, t)
    if why:
        log.warning("attention init: projections not copied (%s); embeddings, norms and head only", "; ".join(why))
    for i, (tl, sl) in enumerate(zip(tm.layers, sm.layers)):
        _copy(sl.norm, tl.input_layernorm)
        mapped.append(f"backbone.layers.{i}.norm.weight")
        if not why:
            mapped += [f"backbone.layers.{i}.mixer.{n}" for n in mixer_from_attention(sl.mixer, tl.self_attn, t, conv_init, gen,
                                                                                      tl.input_layernorm.weight)]
    log.info("attention init: %d tensors copied from the teacher", len(mapped))
    return student, mapped


def build_student(teacher, arch: str = "hybrid", *, attention_layers: Union[float, str, Sequence[int], None] = 0.5,
                  shape: Optional[StudentShape] = None, init: str = "attention", conv_init: str = "identity",
                  seed: int = 0):
    """The student of ``teacher`` for ``arch`` (see the module doc); (model, mapped)."""
    if arch == "hybrid":
        shape = shape or StudentShape()
        idx = attention_layer_indices(attention_layers, teacher_dims(teacher.config)["layers"])
        return build_hybrid(teacher, idx, init, conv_init, seed, shape.conv_kernel, shape.chunk_size)
    if arch == "mamba2":
        return build_mamba2(teacher, shape or StudentShape(), init, conv_init, seed)
    raise ValueError(f"student.arch must be one of {ARCHS}, got {arch!r}")


# ---- the pieces of a student the trainer needs, whatever its class ----

def ssm_mixers(student) -> dict:
    """{layer index: Mamba-2 mixer} of a hybrid or mamba2 student."""
    layers = student.base_model.layers
    if hasattr(layers[0], "mixer") and not hasattr(layers[0], "feed_forward"):
        return {i: layer.mixer for i, layer in enumerate(layers)}
    return {i: layer.mamba for i, layer in enumerate(layers) if getattr(layer, "block_type", "") == "linear_attention"}


def has_attention(model) -> bool:
    cfg = model.config
    return bool(getattr(cfg, "attn_layer_indices", None)) if cfg.model_type == "bamba" else cfg.model_type != "mamba2"
