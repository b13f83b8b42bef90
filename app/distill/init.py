"""Attention -> Mamba-2 initialisation of a student's mixers from a Llama-style teacher (after MambaInLlama,
Wang et al. 2024, "The Mamba in the Llama: Distilling and Accelerating Hybrid Models").

This module knows mixers and attention layers only; ``student.py`` builds the student and calls it (one way:
nothing here imports ``student.py``).

Glossary (Mamba-2, Dao & Gu 2024, "Transformers are SSMs"; transformers' ``BambaMixer`` / ``Mamba2Mixer``):
    d            hidden size (teacher and student)
    H, P         SSM heads and head size (``num_heads``, ``head_dim``); d_inner = expand * d = H * P
    G, N         B/C groups and state size (``n_groups``, ``state_size``); head h reads group h // (H / G)
    x            the SSM input, (T, H, P)                       ~ attention's values V
    B            input -> state projection, (T, G, N)           ~ keys K
    C            state -> output projection, (T, G, N)          ~ queries Q
    z            the gate. transformers' gated norm is y_out = RMSNorm(y * silu(z)) (gate first, then the
                 norm, per group of d_inner / G channels; ``norm_before_gate=False``); no attention counterpart
    dt           step size: dt_t = softplus(W_dt u_t + dt_bias), per head
    A            decay, A = -exp(A_log), per head: the state keeps exp(dt_t A) of itself per token
    D            skip: y_t += D x_t, per head
    in_proj      d -> [z (d_inner) | x (d_inner) | B (G N) | C (G N) | dt (H)], rows in that order
    conv1d       depthwise causal conv over [x | B | C], kernel K, then silu
    out_proj     d_inner -> d                                   ~ attention's output projection O

A linear-attention reading of the SSM (state h_t = a_t h_{t-1} + B_t x_t^T, y_t = C_t h_t) makes C, B, x play
Q, K, V. With expand 1, H = the teacher's heads, P = N = the teacher's head_dim and G = H:
    x rows   <- W_v, each KV head repeated H / kv_heads times (GQA)
    B rows   <- W_k, repeated the same way
    C rows   <- W_q
    out_proj <- W_o
    conv1d   ``identity``: 1 at the last tap, bias 0 (the conv passes the projections on), or ``default``:
             the layer's own initialisation
    dt_bias  inverse softplus of dt ~ exp(U(log 1e-3, log 0.1)) (MambaInLlama / mamba-ssm), so that
             softplus(dt_bias) spans 1e-3 .. 0.1: long memories for some heads, short for others.
             transformers' default (dt_bias = 1, softplus 1.31) forgets almost everything within a few tokens
    A_log    log U(1, 16)
    D        1
    z        a constant gate (ours, measured): z rows 0 and their in_proj bias +4, so silu(z) is the same for every
             channel and token and the gated norm passes the linear-attention output y on as norm(y). With
             transformers' random z rows, silu(z) flips the sign of each channel at random and the mixer's output
             is uncorrelated with the attention output it replaces (mean cosine over SmolLM2's 30 layers, on
             held-out text: 0.02 with random z, 0.42 with the constant gate; ``benchmarks/distill_quality.py``
             --only init). Needs an in_proj bias (the hybrid student has one; without, z is left as it is).
    norm     the gated norm's weight, per channel: GATE_NORM_SCALE * ||row of W_v diag(g)||, g the layer's input
             norm weight: the RMS the value projection gives a unit-RMS input, scaled down to the attention
             output's (a softmax average of values is smaller than one value; 0.15 measured best of 0.1 .. 1 on
             SmolLM2: relative error of the mixer output 0.97 vs 25 at weight 1)
    dt rows: the layer's own initialisation.
The in_proj bias stays 0 on x, B and C (``XBC_BIAS_FROZEN``: the trainer keeps it there), so that left padding
stays exact: padded positions are zeroed before in_proj, and a bias there would reach the first real tokens
through the conv. Biases of q/k/v (Qwen2) are therefore not copied.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
GATE_BIAS = 4.0
XBC_BIAS_FROZEN = True
GATE_NORM_SCALE = 0.15
A_LOW, A_HIGH = 1.0, 16.0
CONV_INITS = ("identity", "default")


def teacher_dims(cfg) -> dict:
    """hidden, layers, heads, kv_heads, head_dim, vocab of a Llama-style teacher config."""
    heads = cfg.num_attention_heads
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, "vocab": cfg.vocab_size}


def repeat_heads(w, kv_heads: int, heads: int, head_dim: int):
    """(kv_heads * head_dim, d) -> (heads * head_dim, d): each KV head repeated heads / kv_heads times."""
    d = w.shape[1]
    return w.view(kv_heads, head_dim, d).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, d)


def mixer_dims(mixer) -> dict:
    """H, P, G, N, d_inner of a transformers Mamba-2 mixer (``BambaMixer`` or ``Mamba2Mixer``)."""
    return {"heads": mixer.num_heads, "head_dim": mixer.head_dim, "groups": mixer.n_groups,
            "state": mixer.ssm_state_size, "d_inner": mixer.intermediate_size}


def copy_mismatch(mixer, dims: dict) -> list[str]:
    """Why the Q/K/V/O copy cannot fill this mixer (empty: it can)."""
    m = mixer_dims(mixer)
    return [msg for ok, msg in (
        (m["heads"] == dims["heads"], f"SSM heads {m['heads']} != teacher heads {dims['heads']}"),
        (m["head_dim"] == dims["head_dim"], f"SSM head_dim {m['head_dim']} != teacher head_dim {dims['head_dim']}"),
        (m["state"] == dims["head_dim"], f"state_size {m['state']} != teacher head_dim {dims['head_dim']}"),
        (m["groups"] == m["heads"], f"n_groups {m['groups']} != heads {m['heads']}"),
        (m["d_inner"] == dims["heads"] * dims["head_dim"], "d_inner != teacher heads * head_dim"),
    ) if not ok]


def ssm_dynamics_init(mixer, generator=None) -> None:
    """dt_bias, A_log and D as MambaInLlama initialises them (see the module doc), in place."""
    import torch

    h = mixer.num_heads
    with torch.no_grad():
        u = torch.rand(h, generator=generator)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp_min(DT_FLOOR)  # (H,)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        mixer.A_log.copy_(torch.log(torch.empty(h).uniform_(A_LOW, A_HIGH, generator=generator)))
        mixer.D.fill_(1.0)


def xbc_bias_slice(mixer) -> slice:
    """The rows of in_proj (and its bias) that feed the conv: [x | B | C]."""
    return slice(mixer.intermediate_size, mixer.intermediate_size + mixer.conv_dim)


def conv_identity(mixer) -> None:
    import torch

    with torch.no_grad():
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0  # (C, 1, K): the last tap multiplies the current position
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.zero_()


def mixer_from_attention(mixer, attn, dims: dict, conv: str = "identity", generator=None,
                         input_norm=None) -> list[str]:
    """Fill ``mixer`` (in place) from the teacher's attention module ``attn`` (q/k/v/o_proj) as in the module doc;
    ``dims``: ``teacher_dims`` of the teacher; ``input_norm``: the layer's input RMSNorm weight (d,), for the
    gated norm's scale. Returns the names of what was set (relative to the mixer)."""
    import torch

    if conv not in CONV_INITS:
        raise ValueError(f"conv init must be one of {CONV_INITS}, got {conv!r}")
    why = copy_mismatch(mixer, dims)
    if why:
        raise ValueError("the attention init cannot fill this mixer: " + "; ".join(why))
    m = mixer_dims(mixer)
    d_inner, gn = m["d_inner"], m["groups"] * m["state"]
    x0, b0, c0 = d_inner, 2 * d_inner, 2 * d_inner + gn
    with torch.no_grad():
        rows = mixer.in_proj.weight  # (d_inner + d_inner + 2 G N + H, d)
        rows[x0:b0].copy_(repeat_heads(attn.v_proj.weight, dims["kv_heads"], dims["heads"], dims["head_dim"]))
        rows[b0:c0].copy_(repeat_heads(attn.k_proj.weight, dims["kv_heads"], dims["heads"], dims["head_dim"]))
        rows[c0:c0 + gn].copy_(attn.q_proj.weight)
        mixer.out_proj.weight.copy_(attn.o_proj.weight)
        if mixer.out_proj.bias is not None:
            mixer.out_proj.bias.copy_(attn.o_proj.bias if getattr(attn.o_proj, "bias", None) is not None else 0.0)
        done = ["in_proj.weight[x,B,C]", "out_proj.weight"]
        if mixer.in_proj.bias is not None:  # the constant gate
            rows[:d_inner].zero_()
            mixer.in_proj.bias.zero_()
            mixer.in_proj.bias[:d_inner] = GATE_BIAS
            wv = rows[x0:b0] * (input_norm.to(rows)[None, :] if input_norm is not None else 1.0)  # (d_inner, d)
            mixer.norm.weight.copy_(GATE_NORM_SCALE * wv.norm(dim=1))
            done += ["in_proj[z]", "in_proj.bias", "norm.weight"]
    if conv == "identity":
        conv_identity(mixer)
        done.append("conv1d")
    ssm_dynamics_init(mixer, generator)
    return done + ["dt_bias", "A_log", "D"]
