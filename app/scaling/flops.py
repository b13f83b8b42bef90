"""Parameter and training-FLOP counts of Llama-style Transformers and Mamba-2 models.

Two counts, as in the Chinchilla paper (Hoffmann et al. 2022):
    ``flops_6nd(N, D) = 6 N D``      the usual approximation (forward 2ND, backward 4ND)
    ``training_flops(shape, D, T)``  an exact per-layer count in the spirit of the paper's Appendix F:
                                     forward FLOPs per sequence of T tokens, times 3 for forward + backward
                                     (the backward pass costs twice the forward), times D / T sequences.

What the exact count counts, per sequence of T tokens (a multiply-add is 2 FLOPs):
    embeddings      2 T V d                              (Appendix F counts the lookup as a one-hot matmul)
    Llama layer     Q, K, V projections  2 T d (H + 2 KV) hd      (grouped-query: KV heads of K and V)
                    logits Q Kᵀ          2 T² H hd                (the full T x T, as Appendix F)
                    softmax              3 H T²
                    softmax @ V          2 T² H hd
                    output projection    2 T H hd d
                    MLP                  2 T d F x 3 if gated (SwiGLU: gate, up, down), x 2 otherwise
    Mamba-2 layer   in_proj              2 T d (2 d_in + 2 G N + H)     (z, x, B, C, dt)
                    causal conv          2 T (d_in + 2 G N) K
                    SSD, chunk Q         C Bᵀ in each chunk 2 T Q N G,   (L ∘ C Bᵀ) X 2 T Q P H,
                                         chunk states Bᵀ X 2 T N P H,    state passing 2 (T/Q) N P H,
                                         state output C h 2 T N P H
                    out_proj             2 T d_in d
    logits          2 T d V
Not counted (as in Appendix F): norms, activations, rotary embeddings, the SSM's gating, decay and skip
(element-wise work). The SSD terms are the chunked algorithm of Dao & Gu 2024 (Mamba-2, Sec. 6) with the
state passing a sequential scan, as mamba-ssm's kernel runs it (transformers' torch path does the state
passing as a (T/Q+1)² matmul instead; the matmul terms are otherwise the same, which the tests check with
``torch.utils.flop_counter``).

Glossary (Mamba-2): d hidden size, d_in = expand d, H SSM heads, P head dim (H P = d_in), N state size,
G B/C groups, K conv width, Q chunk length. Llama: H attention heads, KV key/value heads, hd head dim,
F MLP width. V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class TransformerShape:
    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffw: int
    gated: bool = True
    """SwiGLU (three MLP matrices) as Llama; False: two (GPT-2)."""
    tied: bool = False
    """Output layer shares the embedding matrix."""


@dataclass(frozen=True)
class Mamba2Shape:
    vocab: int
    d_model: int
    layers: int
    heads: int
    head_dim: int
    state: int
    groups: int
    conv_kernel: int = 4
    chunk: int = 256
    conv_bias: bool = True
    proj_bias: bool = False
    tied: bool = False

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim


Shape = Union[TransformerShape, Mamba2Shape]


def shape_of(config: Any) -> Shape:
    """The shape of a transformers config: Mamba2Config, or a Llama-style one (Llama, Mistral, Qwen2, ...)."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if getattr(config, "model_type", "") == "mamba2":
        return Mamba2Shape(vocab=config.vocab_size, d_model=config.hidden_size, layers=config.num_hidden_layers,
                           heads=config.num_heads, head_dim=config.head_dim, state=config.state_size,
                           groups=config.n_groups, conv_kernel=config.conv_kernel, chunk=config.chunk_size,
                           conv_bias=bool(config.use_conv_bias), proj_bias=bool(config.use_bias), tied=tied)
    heads = config.num_attention_heads
    return TransformerShape(vocab=config.vocab_size, d_model=config.hidden_size, layers=config.num_hidden_layers,
                            heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                            ffw=config.intermediate_size, tied=tied)


def params(shape: Shape) -> dict:
    """{"total", "non_embedding", "embedding"} parameter counts (the output layer counts as embedding)."""
    d, v = shape.d_model, shape.vocab
    if isinstance(shape, TransformerShape):
        h, kv, hd = shape.heads, shape.kv_heads, shape.head_dim
        layer = d * hd * (h + 2 * kv) + h * hd * d + d * shape.ffw * (3 if shape.gated else 2) + 2 * d  # + 2 norms
    else:
        di, g, n, hh = shape.d_inner, shape.groups, shape.state, shape.heads
        proj_out = 2 * di + 2 * g * n + hh
        conv_ch = di + 2 * g * n
        layer = (d * proj_out + (proj_out if shape.proj_bias else 0)  # in_proj
                 + conv_ch * shape.conv_kernel + (conv_ch if shape.conv_bias else 0)  # depthwise conv
                 + 3 * hh  # dt_bias, A_log, D
                 + di  # gated RMSNorm
                 + di * d + (d if shape.proj_bias else 0)  # out_proj
                 + d)  # the block's norm
    body = shape.layers * layer + d  # + final norm
    emb = v * d * (1 if shape.tied else 2)
    return {"total": body + emb, "non_embedding": body, "embedding": emb}


def forward_flops(shape: Shape, seq_len: int) -> dict:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, by part (see the module doc), and their "total"."""
    t, d, v = seq_len, shape.d_model, shape.vocab
    parts = {"embeddings": 2 * t * v * d}
    if isinstance(shape, TransformerShape):
        h, kv, hd = shape.heads, shape.kv_heads, shape.head_dim
        layer = {"qkv": 2 * t * d * (h + 2 * kv) * hd, "attn_logits": 2 * t * t * h * hd, "softmax": 3 * h * t * t,
                 "attn_values": 2 * t * t * h * hd, "attn_out": 2 * t * h * hd * d,
                 "mlp": 2 * t * d * shape.ffw * (3 if shape.gated else 2)}
    else:
        di, g, n, hh, p, q = shape.d_inner, shape.groups, shape.state, shape.heads, shape.head_dim, shape.chunk
        q = min(q, t)
        chunks = math.ceil(t / q)
        layer = {"in_proj": 2 * t * d * (2 * di + 2 * g * n + hh), "conv": 2 * t * (di + 2 * g * n) * shape.conv_kernel,
                 "ssd_cb": 2 * t * q * n * g, "ssd_intra": 2 * t * q * p * hh, "ssd_states": 2 * t * n * p * hh,
                 "ssd_passing": 2 * chunks * n * p * hh, "ssd_out": 2 * t * n * p * hh, "out_proj": 2 * t * di * d}
    for k, f in layer.items():
        parts[k] = shape.layers * f
    parts["logits"] = 2 * t * d * v
    parts["total"] = sum(parts.values())
    return parts


def training_flops(shape: Shape, tokens: float, seq_len: int) -> float:
    """Exact training FLOPs of ``tokens`` tokens in sequences of ``seq_len``: 3 x forward (forward + backward)."""
    return 3.0 * forward_flops(shape, seq_len)["total"] * tokens / seq_len


def flops_per_token(shape: Shape, seq_len: int) -> float:
    return 3.0 * forward_flops(shape, seq_len)["total"] / seq_len


def flops_6nd(n_params: float, tokens: float) -> float:
    """The standard approximation C = 6 N D."""
    return 6.0 * n_params * tokens
