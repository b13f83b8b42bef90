"""How much memory one distillation worker needs, estimated before the run starts, and the refusal when the
workers a node would host do not fit it.

Per worker (fp32 training; the teacher in train.teacher_dtype, by default fp32 on CPU and bf16 on GPU):
    teacher      its parameters (the frozen copy every worker loads)
    student      parameters + gradients + AdamW's two moments: 16 bytes per parameter
    activations  what autograd keeps for the backward pass, per token of the batch (train.batch_size x seq_len),
                 summed over the layers:
                   every layer      norms and the residual stream: ~6 d floats
                   MLP (hybrid)     gate, up, act(gate), their product: 4 I + 2 d floats
                   attention        q, k, v, rotated q and k, the output: ~6 d floats (fused SDPA keeps no T x T)
                   Mamba-2 mixer    in_proj output, conv in/out, x, B, C, dt: ~14 d floats; the torch path's chunked
                                    scan adds its (chunk x chunk) tensors per head (G, L, M, the decay and their
                                    copies for the backward: ~20 l H) and the chunk states (~8 H P N / l); the
                                    mamba-ssm kernels recompute those instead
                   the teacher's forward (no gradients) and, stage align, its taps: one layer's worth + 2 d per layer
    logits       the KD/CE chunk: train.kd_chunk_tokens x vocab, ~6 fp32 copies (student and teacher logits,
                 log-softmaxes, the gradient)
    runtime      ~0.6 GiB per worker process (torch, transformers, Ray's worker, DDP's gradient buckets)
The constants were set against measured peaks (``benchmarks/distill_memory.py`` prints the estimate next to
the peak RSS of real steps). A node's budget is 85% of its memory (Ray's OOM monitor kills at 95%).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

GiB = 1024 ** 3
RUNTIME_BYTES = int(0.6 * GiB)
NODE_FRACTION = 0.85
LOGIT_COPIES = 6


@dataclass
class Estimate:
    teacher: int
    student: int
    activations: int
    logits: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.teacher + self.student + self.activations + self.logits + self.runtime

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
        return (f"{g(self.total)} GiB (teacher {g(self.teacher)}, student + optimizer {g(self.student)}, "
                f"activations {g(self.activations)}, logits {g(self.logits)}, runtime {g(self.runtime)})")


@functools.lru_cache(maxsize=32)
def _count(model_type: str, config_json: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **json.loads(config_json))
    with torch.device("meta"):  # shapes only: no memory, no init work
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def param_count(model_cfg) -> int:
    """The exact parameter count of the causal LM ``model_cfg`` describes (a transformers config): the model is
    built on the meta device, so nothing is allocated."""
    d = model_cfg.to_dict()
    return _count(d.pop("model_type"), json.dumps(d, sort_keys=True, default=str))


def estimate(cfg, teacher_cfg, kernels: bool = False) -> Estimate:
    """The per-worker estimate of DistillConfig ``cfg`` for a teacher with config ``teacher_cfg``; ``kernels``: the
    mamba-ssm kernels run the scan (CUDA with mamba-ssm installed)."""
    from app.distill.student import attention_layer_indices, hybrid_config, student_config

    sc, tc = cfg.student, cfg.train
    d, layers, inter, vocab = (teacher_cfg.hidden_size, teacher_cfg.num_hidden_layers, teacher_cfg.intermediate_size,
                               teacher_cfg.vocab_size)
    teacher_bytes = param_count(teacher_cfg) * tc.teacher_torch_dtype().itemsize
    chunk = sc.chunk_size
    if sc.arch == "hybrid":
        attn = attention_layer_indices(sc.attention_layers, layers)
        scfg = hybrid_config(teacher_cfg, attn, sc.conv_kernel, chunk)
        n_attn, width = len(attn), d
        heads, p, n = scfg.mamba_n_heads, scfg.mamba_d_head, scfg.mamba_d_state
        mlp = 4 * inter + 2 * d
    else:
        scfg = student_config(teacher_cfg, sc.shape())
        n_attn, layers, width = 0, scfg.num_hidden_layers, scfg.hidden_size
        heads, p, n = scfg.num_heads, scfg.head_dim, scfg.state_size
        mlp = 0
    s_params = param_count(scfg)
    mamba = 14 * width + (0 if kernels else 20 * chunk * heads + 8 * heads * p * n // chunk)
    per_token = layers * (6 * width + mlp) + n_attn * 6 * width + (layers - n_attn) * mamba
    teacher_fwd = 6 * d + 4 * inter + 2 * d * layers  # one layer's transient + the taps
    tokens = tc.batch_size * cfg.data.seq_len
    acts = tokens * (per_token + teacher_fwd) * 4
    logits = min(tc.kd_chunk_tokens, tokens) * vocab * 4 * LOGIT_COPIES
    return Estimate(teacher=teacher_bytes, student=16 * s_params, activations=acts, logits=logits)


def node_budgets(num_workers: int, use_gpu: bool = False) -> list[tuple[str, int, int]]:
    """(node, workers it may host, usable bytes) for the alive nodes of the Ray cluster that can host a worker (a
    CPU each, and a GPU each for ``use_gpu``), or this machine."""
    import psutil

    try:
        import ray

        nodes = [nd for nd in ray.nodes() if nd.get("Alive")] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - no cluster to ask: this machine
        nodes = []
    if not nodes:
        return [("this machine", num_workers, int(psutil.virtual_memory().total * NODE_FRACTION))]
    out = []
    for nd in nodes:
        res = nd.get("Resources", {})
        slots = min(num_workers, int(res.get("CPU", 0)), int(res.get("GPU", 0)) if use_gpu else num_workers)
        if slots < 1:  # a head started with --num-cpus=0, a CPU node in a GPU run: never hosts a worker
            continue
        total = int(res.get("memory", 0) + res.get("object_store_memory", 0)) or psutil.virtual_memory().total
        out.append((nd.get("NodeManagerAddress", "?"), slots, int(total * NODE_FRACTION)))
    return out


def check_fits(cfg, teacher_cfg, concurrent_runs: int = 1) -> Estimate:
    """Raise ValueError, naming what to lower, when the workers a node may host (``concurrent_runs`` runs of
    ``train.num_workers`` each, e.g. Tune trials) need more than its budget. GPU runs are checked for host memory
    (the teacher and the student are loaded there first); their device memory is logged only."""
    est = estimate(cfg, teacher_cfg)
    tc = cfg.train
    host_need = est.total if not tc.use_gpu else est.teacher * 2 + est.student // 4 + est.runtime
    for node, slots, budget in node_budgets(tc.num_workers * concurrent_runs, tc.use_gpu):
        need = host_need * slots
        if need > budget:
            per = budget // max(slots, 1)
            raise ValueError(
                f"distill: {slots} workers on node {node} would need about {need / GiB:.1f} GiB, more than its "
                f"{budget / GiB:.1f} GiB budget ({NODE_FRACTION:.0%} of its memory). Per worker: {est.describe()}; "
                f"{per / GiB:.1f} GiB fit. Lower train.batch_size (now {tc.batch_size}) or data.seq_len (now "
                f"{cfg.data.seq_len}), train.kd_chunk_tokens (now {tc.kd_chunk_tokens}), the workers per node "
                f"(train.num_workers {tc.num_workers}" + (f", trials at once {concurrent_runs}" if concurrent_runs > 1
                                                           else "") + "), or set train.memory_check: false")
    log.info("memory estimate per worker: %s", est.describe())
    return est
