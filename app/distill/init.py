"""Attention -> SSM initialisation of the Mamba-2 student from a Llama-style teacher (after MambaInLlama,
Wang et al. 2024, "The Mamba in the Llama: Distilling and Accelerating Hybrid Models").

Glossary (Mamba-2, Dao & Gu 2024, "Transformers are SSMs", and transformers' ``Mamba2Mixer``):
    d            hidden size (teacher and student)
    H, P         SSM heads and head size (``num_heads``, ``head_dim``); d_inner = expand * d = H * P
    G, N         B/C groups and state size (``n_groups``, ``state_size``); head h reads group h // (H / G)
    x            the SSM input, (T, H, P)                       ~ attention's values V
    B            input -> state projection, (T, G, N)           ~ keys K
    C            state -> output projection, (T, G, N)          ~ queries Q
    z            the gate: y = RMSNorm(y) * silu(z)             (no attention counterpart)
    dt, A, D     step size, decay (A = -exp(A_log)), skip       (no counterpart: left at Mamba-2's init)
    in_proj      d -> [z (d_inner) | x (d_inner) | B (G N) | C (G N) | dt (H)], rows in that order
    conv1d       depthwise causal conv over [x | B | C], kernel K
    out_proj     d_inner -> d                                   ~ attention's output projection O

A linear-attention reading of the SSM (state h_t = a_t h_{t-1} + B_t x_t^T, y_t = C_t h_t) makes C, B, x
play Q, K, V. With expand 1, H = the teacher's heads, P = N = the teacher's head_dim and G = H:
    x rows   <- W_v, each KV head repeated H / kv_heads times (GQA)
    B rows   <- W_k, repeated the same way
    C rows   <- W_q
    out_proj <- W_o
    conv1d   <- identity on x, B, C (1 at the last tap, bias 0): at init the conv passes the projections on
    block norm <- the layer's input_layernorm; norm_f <- the final norm; embeddings and an untied lm_head
                 copied
Where the shapes do not allow the projection copy, only embeddings, norms and the head are copied, and the
log says why. Biases of q/k/v (Qwen2) have no place in a bias-free in_proj and are not copied.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def repeat_heads(w, kv_heads: int, heads: int, head_dim: int):
    """(kv_heads * head_dim, d) -> (heads * head_dim, d): each KV head repeated heads / kv_heads times."""
    d = w.shape[1]
    return w.view(kv_heads, head_dim, d).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, d)


def attention_init(student, teacher) -> list[str]:
    """Copy teacher weights into ``student`` (in place) as described above; returns the student tensors set."""
    import torch

    from app.distill.student import teacher_dims

    t = teacher_dims(teacher.config)
    sc = student.config
    tm, sm = teacher.model, student.backbone
    done: list[str] = []
    with torch.no_grad():
        sm.embeddings.weight.copy_(tm.embed_tokens.weight)
        sm.norm_f.weight.copy_(tm.norm.weight)
        done += ["backbone.embeddings.weight", "backbone.norm_f.weight"]
        if not sc.tie_word_embeddings:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
            done.append("lm_head.weight")
        d_inner = sc.expand * sc.hidden_size
        why = [msg for ok, msg in (
            (sc.num_heads == t["heads"], f"student heads {sc.num_heads} != teacher heads {t['heads']}"),
            (sc.head_dim == t["head_dim"], f"student head_dim {sc.head_dim} != teacher head_dim {t['head_dim']}"),
            (sc.state_size == t["head_dim"], f"state_size {sc.state_size} != teacher head_dim {t['head_dim']}"),
            (sc.n_groups == sc.num_heads, f"n_groups {sc.n_groups} != heads {sc.num_heads}"),
            (d_inner == t["heads"] * t["head_dim"], f"d_inner {d_inner} != teacher heads * head_dim"),
        ) if not ok]
        if why:
            log.warning("attention init: projections not copied (%s); embeddings, norms and head only", "; ".join(why))
        gn = sc.n_groups * sc.state_size
        for i, (tl, sl) in enumerate(zip(tm.layers, sm.layers)):
            sl.norm.weight.copy_(tl.input_layernorm.weight)
            done.append(f"backbone.layers.{i}.norm.weight")
            if why:
                continue
            at, mx = tl.self_attn, sl.mixer
            rows = mx.in_proj.weight  # (d_inner + d_inner + 2 G N + H, d)
            x0, b0, c0 = d_inner, 2 * d_inner, 2 * d_inner + gn
            rows[x0:b0].copy_(repeat_heads(at.v_proj.weight, t["kv_heads"], t["heads"], t["head_dim"]))
            rows[b0:c0].copy_(repeat_heads(at.k_proj.weight, t["kv_heads"], t["heads"], t["head_dim"]))
            rows[c0:c0 + gn].copy_(at.q_proj.weight)
            mx.out_proj.weight.copy_(at.o_proj.weight)
            mx.conv1d.weight.zero_()
            mx.conv1d.weight[:, 0, -1] = 1.0  # identity: the last tap multiplies the current position
            if mx.conv1d.bias is not None:
                mx.conv1d.bias.zero_()
            done += [f"backbone.layers.{i}.mixer.{n}" for n in ("in_proj.weight[x,B,C]", "out_proj.weight", "conv1d")]
    return done
