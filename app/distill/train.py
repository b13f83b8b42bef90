"""Distillation on Ray Train: a frozen teacher in each worker, the student (hybrid or mamba2, ``student.py``)
data-parallel (DDP or FSDP).

``distill(cfg)`` (the driver): data packed (``data.py``), the plan, the memory estimate (``memory.py``), a rerun's
settings checked against the checkpoints it would resume, the resolved config and the run key saved, optional
teacher top-k cache (``cache.py``), then a ``TorchTrainer`` (Ray Train v2) runs ``train_loop`` on ``train.num_workers`` workers with
``FailureConfig(max_failures)``: a failed worker group restarts from the last checkpoint. The student is
exported from the final checkpoint with the teacher's tokenizer (``save_pretrained``).

Per step, worker ``rank`` reads its batch (``data.batch_rows``), runs the teacher without gradients (bf16 on
GPU) for what the stage needs, and the student's loss for the stage (``losses.py``). Stages follow each
other by token budget: align -> kd -> ce. Stage align is teacher-forced: forward hooks on the teacher's attention
modules (``TeacherTaps``) give each Mamba-2 mixer its normed input and its target output. The learning rate is a
pure function of the step (two segments, stage align at its own peak, then kd + ce; each with linear warmup and
cosine to 10%), so a resumed run needs only the step, the weights and the optimizer state.

Checkpoint (every ``train.checkpoint_every`` steps and at the end), written by rank 0:
    student/          save_pretrained of the student (config.json + model.safetensors)
    optimizer.pt      the AdamW state (loaded with torch.load(weights_only=True, map_location="cpu"): every rank
                      restores to its own device, whatever device saved it)
    loss_weights.safetensors   the learned log-variances (stages.weighting: auto)
    state.json        step, tokens seen, stage (the data position is the step: batches are a function of it) and
                      the run key (``run_key``): a checkpoint resumes only under the settings that made it
Logs: one line per step on rank 0 (each loss part, lr, tokens/s), ``metrics.jsonl`` and TensorBoard
(``tensorboard --logdir OUTPUT/tensorboard``) in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

STAGES = ("align", "kd", "ce")


@dataclass
class Plan:
    """Steps per stage from the token budgets; ``stage_at(step)``."""

    tokens_per_step: int
    steps: dict

    @classmethod
    def make(cls, stages_cfg, tokens_per_step: int) -> "Plan":
        steps = {s: math.ceil(getattr(stages_cfg, f"{s}_tokens") / tokens_per_step) for s in STAGES}
        return cls(tokens_per_step, steps)

    @property
    def total(self) -> int:
        return sum(self.steps.values())

    def stage_at(self, step: int) -> str:
        end = 0
        for s in STAGES:
            end += self.steps[s]
            if step < end:
                return s
        raise IndexError(step)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def stage_lr(step: int, plan: "Plan", lr: float, align_lr: Optional[float], warmup: int) -> float:
    """Two learning-rate segments, each with its own warmup and cosine: stage align at ``align_lr`` over its steps,
    then stages kd + ce at ``lr`` over theirs."""
    n_align = plan.steps["align"]
    if step < n_align:
        return lr_at(step, n_align, align_lr or lr, min(warmup, n_align))
    rest = plan.total - n_align
    return lr_at(step - n_align, rest, lr, min(warmup, rest))


def _module():
    """The DDP-wrapped module: the student, the losses and (weighting auto) the learned log-variances, so every
    stage's forward runs through DDP."""
    import torch
    from torch import nn

    from app.distill.losses import align_loss, kd_ce_loss, uncertainty_weighted
    from app.distill.student import ssm_mixers

    class DistillModule(nn.Module):
        def __init__(self, student, chunk_tokens: int, auto: bool):
            super().__init__()
            self.student = student
            self.chunk_tokens = chunk_tokens
            self.mixers = ssm_mixers(student)  # {layer: mixer}, a plain dict (the modules are the student's)
            self.mixer_layers = sorted(self.mixers)
            self.auto = auto
            # s_i of the auto weighting: one per mixer in stage align, (KD, CE) in stage kd
            self.log_vars = nn.ParameterDict({"align": nn.Parameter(torch.zeros(max(1, len(self.mixer_layers)))),
                                              "kd": nn.Parameter(torch.zeros(2))}) if auto else None

        def forward(self, input_ids, labels, mask, stage: str, w: dict, teacher: dict, raw: bool = False):
            """The stage's loss and its parts; ``raw``: only {"terms": the terms the auto weighting combines}."""
            if stage == "align":  # each mixer on the teacher's normed input to its layer, against the attention output
                ins, outs = teacher["attn_inputs"], teacher["attn_outputs"]
                parts = torch.stack([align_loss(self.mixers[i](ins[i]), outs[i], mask)
                                     for i in self.mixer_layers])  # (n_mixers,)
                if raw:
                    return {"terms": parts}
                align = parts.mean()
                loss = uncertainty_weighted(parts, self.log_vars["align"]) if self.auto else w["align_weight"] * align
                return {"loss": loss, "align": align.detach()}
            h = self.student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, d), normed
            head = self.student.get_output_embeddings().weight  # (V, d)
            if stage == "kd":
                kd, ce = kd_ce_loss(h, head, mask, labels, teacher_hidden=teacher.get("hidden"),
                                    teacher_head=teacher.get("head"), teacher_topk=teacher.get("topk"),
                                    temperature=w["temperature"], chunk_tokens=self.chunk_tokens)
                if raw:
                    return {"terms": torch.stack([kd, ce])}
                if self.auto:
                    loss = uncertainty_weighted(torch.stack([kd, ce]), self.log_vars["kd"])
                else:
                    loss = w["kd_weight"] * kd + w["kd_ce_weight"] * ce
                return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}
            _, ce = kd_ce_loss(h, head, mask, labels, chunk_tokens=self.chunk_tokens)
            return {"loss": ce, "ce": ce.detach()}

    return DistillModule


class TeacherTaps:
    """Forward hooks on chosen attention modules of a Llama-style teacher: their input (the layer's normed hidden
    states) and their output."""

    def __init__(self, teacher, layers):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for i in layers:
            attn = teacher.model.layers[i].self_attn
            self.handles.append(attn.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(_mod, args, kwargs):
            self.inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _post(self, i):
        def hook(_mod, _args, out):
            self.outputs[i] = out[0] if isinstance(out, tuple) else out
        return hook

    def take(self) -> tuple[dict, dict]:
        ins, outs = dict(self.inputs), dict(self.outputs)
        self.inputs.clear()
        self.outputs.clear()
        return ins, outs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _keep_xbc_bias_zero(student) -> None:
    """The mixers' in_proj bias on x, B, C stays 0 through training (init.py: left padding stays exact): its
    gradient is zeroed, so AdamW never moves it (decoupled weight decay of 0 is 0)."""
    from app.distill.init import xbc_bias_slice
    from app.distill.student import ssm_mixers

    for mixer in ssm_mixers(student).values():
        bias = mixer.in_proj.bias
        if bias is None:
            continue
        sl = xbc_bias_slice(mixer)

        def hook(grad, sl=sl):
            grad = grad.clone()
            grad[sl] = 0
            return grad

        bias.register_hook(hook)


def _start_log_vars(model, batch: tuple, log_vars) -> None:
    """At the first step of a stage (weighting auto): s_i = log L_i of this batch's terms, averaged over the ranks,
    the minimum of exp(-s) L + s for the current losses. The weights then start at 1 / L_i (every term at the same
    scale) and follow the losses as they fall, instead of creeping from s = 0. A pure function of the weights and
    the step's batch, so a run resumed at this step starts its stage the same way."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        terms = model(*batch, raw=True)["terms"].detach().double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(terms)
            terms /= dist.get_world_size()
        log_vars.copy_(terms.clamp_min(1e-8).log().to(log_vars.dtype))


def _unwrap(model):
    return getattr(model, "module", model)


def is_fsdp(model) -> bool:
    """Whether ``model`` is FSDP-wrapped. What the run asked for is not enough: Ray Train's ``prepare_model`` wraps
    nothing with one worker, whatever ``train.strategy`` says."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP)


def clip_grads(model, max_norm: float):
    """Clip the gradient norm to ``max_norm``: FSDP's own clip (the norm over every shard) where the model is
    sharded, torch's otherwise; returns the norm before clipping."""
    import torch

    if is_fsdp(model):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _full_state(model, optimizer) -> tuple[dict, dict, dict]:
    """(student state dict, loss-weight state dict, optimizer state dict), whole; under FSDP gathered onto rank 0
    (every rank calls)."""
    if not is_fsdp(model):
        mod = _unwrap(model)
        extra = {f"log_vars.{k}": v.detach() for k, v in mod.log_vars.items()} if mod.log_vars is not None else {}
        return mod.student.state_dict(), extra, optimizer.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                              FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        sd = model.state_dict()
        osd = FSDP.optim_state_dict(model, optimizer)
    return ({k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")},
            {k: v for k, v in sd.items() if k.startswith("log_vars.")}, osd)


def _save_checkpoint(path: str, student, weights: dict, extra: dict, optim_state: dict, state: dict) -> None:
    import torch
    from safetensors.torch import save_file

    student.save_pretrained(os.path.join(path, "student"), state_dict=weights)
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(path, "loss_weights.safetensors"))
    torch.save(optim_state, os.path.join(path, "optimizer.pt"))
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)


def train_loop(config: dict) -> None:
    """Ray Train worker function (``config``: the resolved DistillConfig as a dict, the packed data, the plan)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from app.config import _build
    from app.distill.config import DistillConfig
    from app.distill.data import PackedRows, batch_rows
    from app.distill.losses import TeacherTopK
    from app.distill.student import build_student
    from app.distill.teacher import HeadLogits, body_hidden, nll_sum
    from app.models import load_causal_lm, load_model_config

    cfg = _build(DistillConfig, config["cfg"])
    plan = Plan(**config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    out = config["output"]
    tc, sc = cfg.train, cfg.stages
    torch.manual_seed(tc.seed)

    topk_rows = config.get("topk")
    needs_teacher = (plan.steps["align"] > 0 or (plan.steps["kd"] > 0 and not topk_rows) or tc.eval_teacher
                     or cfg.student.init == "attention" or cfg.student.arch == "hybrid")
    teacher = load_causal_lm(cfg.teacher, device=str(device), dtype=tc.teacher_torch_dtype()) if needs_teacher \
        else None
    teacher_head = HeadLogits(teacher.model) if teacher is not None else None  # its logits, through its own head
    student, _ = build_student(teacher.model if teacher else load_model_config(cfg.teacher), cfg.student.arch,
                               attention_layers=cfg.student.attention_layers, shape=cfg.student.shape(),
                               init=cfg.student.init, conv_init=cfg.student.conv_init, seed=tc.seed)
    auto = sc.weighting == "auto"
    module = _module()(student, tc.kd_chunk_tokens, auto)
    start, tokens_seen = 0, 0
    ckpt = ray.train.get_checkpoint()
    opt_state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "state.json")) as f:
                st = json.load(f)
            differs = run_key_diff(st.get("run"), config["run_key"])
            if differs:  # prepare() refuses this before the run starts; a checkpoint from elsewhere lands here
                raise RuntimeError(f"the checkpoint was made by a run with other settings ({differs})")
            missing, unexpected = student.load_state_dict(load_file(os.path.join(d, "student", "model.safetensors")),
                                                          strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is not saved
                raise RuntimeError(f"checkpoint does not fit the student: missing {missing}, unexpected {unexpected}")
            if module.log_vars is not None:
                lw = load_file(os.path.join(d, "loss_weights.safetensors"))
                with torch.no_grad():
                    for k, v in module.log_vars.items():
                        v.copy_(lw[f"log_vars.{k}"])
            # to CPU whatever device saved it (every rank on cuda:0 otherwise); load_state_dict moves each tensor
            # to its parameter's device, and the reference is dropped once loaded
            opt_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
            start, tokens_seen = st["step"], st["tokens"]
        if rank == 0:
            _log_event(out, {"event": "resumed", "step": start})
            log.info("resumed from the checkpoint at step %d", start)
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()
    # stage align leaves embeddings, MLPs, the head (and kept attention) unused; auto weighting, the other
    # stage's log-variances
    unused = plan.steps["align"] > 0 or module.log_vars is not None
    model = ray.train.torch.prepare_model(module, parallel_strategy=tc.strategy,
                                          parallel_strategy_kwargs={"find_unused_parameters": unused}
                                          if tc.strategy == "ddp" else None)
    _keep_xbc_bias_zero(student)
    decay = [p for n, p in model.named_parameters() if "log_vars" not in n]
    log_vars = [p for n, p in model.named_parameters() if "log_vars" in n]
    # the log-variances: no weight decay, their own constant learning rate (the stage schedule is the student's)
    opt = torch.optim.AdamW([{"params": decay}, {"params": log_vars, "weight_decay": 0.0, "lr": sc.auto_lr}],
                            lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95))
    if opt_state is not None:
        if is_fsdp(model):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            opt_state = FSDP.optim_state_dict_to_load(model, opt, opt_state)
        try:
            opt.load_state_dict(opt_state)
        except ValueError as e:  # e.g. a checkpoint of an older version (one parameter group)
            raise RuntimeError(f"the checkpoint's optimizer state does not fit this run's optimizer ({e}); it was "
                               "made by another version or setup: use a new output directory") from e
        opt_state = None
        opt.param_groups[1].update(lr=sc.auto_lr, weight_decay=0.0)  # the loaded state carries the saved values
    train_rows = PackedRows(config["data"]["train"])
    eval_rows = PackedRows(config["data"]["eval"]) if config["data"]["eval"] else None
    topk_reader = None
    if topk_rows:
        from app.distill.cache import TopKRows

        topk_reader = TopKRows(topk_rows["files"], topk_rows["k"])
    loss_w = {"align_weight": sc.align_weight, "kd_weight": sc.kd_weight, "kd_ce_weight": sc.kd_ce_weight,
              "temperature": sc.temperature}
    mixer_layers = _unwrap(model).mixer_layers
    taps = TeacherTaps(teacher.model, mixer_layers) if plan.steps["align"] > start else None
    writer = None
    if rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"))
    teacher_eval: Optional[float] = None

    def evaluate() -> dict:
        nonlocal teacher_eval
        if eval_rows is None or eval_rows.rows == 0:
            return {}
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # student nll, teacher nll, tokens (NCCL: on device)
        fsdp = is_fsdp(model)
        bs = tc.batch_size
        n = min(tc.eval_batches * bs, eval_rows.rows)  # the first n held-out rows, shared out among the ranks
        batches = [j for j in range(-(-n // bs)) if j % world == rank]
        if fsdp:  # FSDP's forward gathers shards collectively: every rank the same number of batches
            batches = batches[: (n // bs) // world]
        # DDP: the module itself (no collectives, so ranks may differ in batches); FSDP: the wrapper (it holds shards)
        fwd = model if fsdp else _unwrap(model)
        with torch.no_grad():
            for j in batches:
                ids = torch.from_numpy(eval_rows.take(np.arange(j * bs, min((j + 1) * bs, n)))).to(device)
                x, y = ids[:, :-1], ids[:, 1:]
                mask = torch.ones_like(x, dtype=torch.bool)
                ce_s = fwd(x, y, mask, "ce", loss_w, {})["ce"]
                sums[0] += float(ce_s) * y.numel()
                if teacher_eval is None and teacher is not None:
                    sums[1] += nll_sum(teacher_head, body_hidden(teacher.model, x), y, tc.kd_chunk_tokens)
                sums[2] += y.numel()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        model.train()
        if teacher_eval is None and teacher is not None and sums[2] > 0:
            teacher_eval = math.exp(float(sums[1] / sums[2]))
        loss = float(sums[0] / sums[2]) if sums[2] > 0 else float("nan")
        return {"eval_loss": loss, "eval_student_ppl": math.exp(min(loss, 700.0)) if sums[2] > 0 else float("nan"),
                "eval_teacher_ppl": teacher_eval, "eval_tokens": int(sums[2])}

    model.train()
    t_last = time.perf_counter()
    metrics: dict = {}
    for step in range(start, plan.total):
        stage = plan.stage_at(step)
        if taps is not None and stage != "align":
            taps.remove()
            taps = None
        lr = stage_lr(step, plan, tc.lr, sc.align_lr, tc.warmup_steps)
        opt.param_groups[0]["lr"] = lr
        rows = batch_rows(step, rank, world, tc.batch_size, train_rows.rows, tc.seed)
        ids = torch.from_numpy(train_rows.take(rows)).to(device)
        x, y = ids[:, :-1], ids[:, 1:]
        mask = torch.ones_like(x, dtype=torch.bool)
        teach: dict = {}
        with torch.no_grad():
            if stage == "align":
                body_hidden(teacher.model, x)  # the taps record what align needs
                inputs, outputs = taps.take()
                teach = {"attn_inputs": {i: t.float() for i, t in inputs.items()},
                         "attn_outputs": {i: t.float() for i, t in outputs.items()}}
            elif stage == "kd" and topk_reader is not None:
                tid, tlog = topk_reader.take(rows)
                teach = {"topk": TeacherTopK(torch.from_numpy(tid).to(device), torch.from_numpy(tlog).to(device))}
            elif stage == "kd":
                teach = {"hidden": body_hidden(teacher.model, x), "head": teacher_head}
        if tc.debug_fail_at_step is not None and step == tc.debug_fail_at_step and rank == 0:
            marker = os.path.join(out, ".debug_failed")
            if not os.path.exists(marker):
                open(marker, "w").close()
                if tc.debug_fail_mode == "kill":
                    # Ray Train's controller learns of a reported checkpoint when it next polls the workers (every
                    # 2 s): a worker that dies sooner loses it, and the run falls back to the one before. The
                    # drill waits that out, so it tests the restore, not the race.
                    time.sleep(5)
                    log.warning("debug_fail_at_step: killing this worker (pid %d) at step %d", os.getpid(), step)
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"debug_fail_at_step: failing once at step {step}")
        starts = auto and stage != "ce" and (step == 0 or plan.stage_at(step - 1) != stage)
        if starts:
            _start_log_vars(model, (x, y, mask, stage, loss_w, teach), _unwrap(model).log_vars[stage])
        parts = model(x, y, mask, stage, loss_w, teach)
        parts["loss"].backward()
        if starts:  # they sit at their optimum for this batch: their gradient is rounding noise, not a step to take
            _unwrap(model).log_vars[stage].grad = None
        if tc.grad_clip > 0:
            clip_grads(model, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += plan.tokens_per_step
        vals = torch.tensor([float(parts["loss"])] + [float(parts.get(k, float("nan"))) for k in ("align", "kd", "ce")],
                            dtype=torch.float64, device=device)  # NCCL reduces device tensors only
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vals)
            vals /= world
        now = time.perf_counter()
        metrics = {"step": step + 1, "stage": stage, "loss": float(vals[0]), "lr": lr, "tokens": tokens_seen,
                   "tokens_per_s": plan.tokens_per_step / max(now - t_last, 1e-9)}
        metrics.update({k: float(v) for k, v in zip(("align", "kd", "ce"), vals[1:]) if not math.isnan(float(v))})
        if auto and stage == "kd":  # the weights the auto weighting gives KD and CE now, exp(-s)
            w_kd, w_ce = torch.exp(-_unwrap(model).log_vars["kd"].detach()).tolist()
            metrics.update({"w_kd": w_kd, "w_ce": w_ce})
        t_last = now
        last = step + 1 == plan.total
        if (tc.eval_every and (step + 1) % tc.eval_every == 0) or last:
            metrics.update(evaluate())
        if rank == 0:
            parts_txt = " ".join(f"{k} {metrics[k]:.4f}" for k in ("align", "kd", "ce") if k in metrics)
            evals = ""
            if "eval_student_ppl" in metrics:
                evals = f" eval ppl student {metrics['eval_student_ppl']:.2f}" + (
                    f" teacher {metrics['eval_teacher_ppl']:.2f}" if metrics.get("eval_teacher_ppl") else "")
            print(f"step {step + 1}/{plan.total} [{stage}] loss {metrics['loss']:.4f} {parts_txt} lr {lr:.2e} "
                  f"tok/s {metrics['tokens_per_s']:.0f}{evals}", flush=True)
            _log_event(out, metrics)
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    writer.add_scalar(f"train/{k}", v, step + 1)
        if (step + 1) % tc.checkpoint_every == 0 or last:
            student_state, extra_state, optim_state = _full_state(model, opt)
            with tempfile.TemporaryDirectory() as tmp:
                ck = None
                if rank == 0:
                    _save_checkpoint(tmp, _unwrap(model).student, student_state, extra_state, optim_state,
                                     {"step": step + 1, "tokens": tokens_seen, "stage": stage,
                                      "run": config["run_key"]})
                    ck = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=ck)
    if writer is not None:
        writer.close()


def _log_event(out: str, record: dict) -> None:
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def absolute_paths(cfg):
    """A copy of ``cfg`` with every local path absolute: workers run in another directory, or on another node."""
    cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output), data=dataclasses.replace(
        cfg.data, input=os.path.abspath(cfg.data.input),
        cache_dir=os.path.abspath(cfg.data.cache_dir) if cfg.data.cache_dir else None))
    if os.path.exists(cfg.teacher):
        cfg = dataclasses.replace(cfg, teacher=os.path.abspath(cfg.teacher))
    return cfg


@dataclass
class Prepared:
    """What ``prepare`` makes once per run (or once per Tune sweep): the run's config with absolute paths, the
    packed data, the plan, the teacher's top-k cache (or None), the run key and the teacher's model config."""

    cfg: object
    packed: object
    plan: Plan
    topk: Optional[dict]
    key: dict
    teacher_cfg: object


def run_key(cfg, packed, plan: Plan) -> dict:
    """What fixes a run's data plan and its student: a checkpoint is only resumed by a run with the same key."""
    from app.config import to_dict

    return {"teacher": cfg.teacher, "data": packed.root, "plan": plan.__dict__, "num_workers": cfg.train.num_workers,
            "batch_size": cfg.train.batch_size, "seed": cfg.train.seed, "weighting": cfg.stages.weighting,
            "strategy": cfg.train.strategy, "teacher_dtype": str(cfg.train.teacher_torch_dtype()).replace("torch.", ""),
            "student": to_dict(cfg.student),
            # auto: the log-variances start at each stage's log L and train at auto_lr (earlier: from 0, at lr)
            **({"auto": {"start": "log-terms", "lr": cfg.stages.auto_lr}} if cfg.stages.weighting == "auto" else {})}


def run_key_diff(old: Optional[dict], new: dict) -> str:
    """The settings that differ between two run keys, as ``key: old -> new`` (empty: none; no old key: none)."""
    if old is None:
        return ""

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[pre + k] = v
        return out

    o, n = flat(json.loads(json.dumps(old))), flat(json.loads(json.dumps(new)))
    names = {"plan.tokens_per_step": "tokens per step", "data": "packed data (input, tokenizer, data.seq_len, "
             "data.eval_fraction, data.max_docs)", "num_workers": "train.num_workers", "batch_size": "train.batch_size",
             "seed": "train.seed", "weighting": "stages.weighting", "teacher": "teacher", "strategy": "train.strategy",
             "teacher_dtype": "the teacher's dtype (train.teacher_dtype, train.use_gpu)"}
    return "; ".join(f"{names.get(k, k.replace('plan.steps.', 'steps of stage '))}: {o.get(k)!r} -> {n.get(k)!r}"
                     for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k))


def _check_rerun(out: str, key: dict) -> None:
    """Refuse to continue a run in ``out`` whose checkpoints were made with other settings (nothing is touched)."""
    import glob

    path = os.path.join(out, "run.json")
    # Ray Train v2 makes OUTPUT/ray/train as soon as a trainer starts: a run counts once it wrote a checkpoint
    has_checkpoints = bool(glob.glob(os.path.join(out, "ray", "train", "checkpoint_*")))
    if not (has_checkpoints and os.path.isfile(path)):
        return
    with open(path) as f:
        old = json.load(f)
    differs = run_key_diff(old, key)
    if differs:
        raise ValueError(f"{out} holds checkpoints of a run with other settings, which a rerun would resume: "
                         f"{differs}. Use a new output directory, or restore those settings to resume it.")


def check_student(cfg, teacher_cfg) -> None:
    """Refuse, from the configs alone (before data or workers), a student the workers could not build or align:
    a teacher the copy cannot carry (hybrid, init attention, stage align), a mamba2 shape that cannot work, or one
    other than the teacher's where init attention or stage align needs the teacher's."""
    from app.distill.init import teacher_dims
    from app.distill.student import attention_layer_indices, check_carried, hybrid_config, student_config

    sc = cfg.student
    if sc.arch == "hybrid":
        hybrid_config(teacher_cfg, attention_layer_indices(sc.attention_layers, teacher_dims(teacher_cfg)["layers"]))
        return
    scfg = student_config(teacher_cfg, sc.shape())
    t = teacher_dims(teacher_cfg)
    own = (scfg.hidden_size, scfg.num_hidden_layers) != (t["hidden"], t["layers"])
    for needed, key, why in ((cfg.stages.align_tokens > 0, "stages.align_tokens", "must be 0"),
                             (sc.init == "attention", "student.init", "must be random")):
        if needed:
            check_carried(teacher_cfg, f"{key}: the mamba2 student")
            if own:
                raise ValueError(f"{key} {why} for a mamba2 student of width {scfg.hidden_size} and depth "
                                 f"{scfg.num_hidden_layers}: it needs the teacher's ({t['hidden']}, {t['layers']}) to "
                                 "align each mixer with the teacher's layer / copy its weights")


def prepare(cfg) -> Prepared:
    """The student checked against the teacher's config, data packed (cached), the plan, the memory estimate, a
    rerun's settings checked against the checkpoints it would resume, the resolved config saved in the output
    directory, the top-k cache."""
    import yaml

    from app.config import to_dict
    from app.distill.data import check_eval_split, prepare_data
    from app.models import load_model_config

    cfg = absolute_paths(cfg)
    out = cfg.output
    teacher_cfg = load_model_config(cfg.teacher)
    check_student(cfg, teacher_cfg)
    cache_dir = os.path.abspath(cfg.data.cache_dir or os.path.join(out, "cache"))
    packed = prepare_data(cfg.data, cfg.teacher, cache_dir)
    tc = cfg.train
    if cfg.data.eval_fraction > 0:  # held-out evaluation asked for: it must have rows (FSDP: a batch per worker)
        check_eval_split(packed, cfg.data, tc.batch_size * tc.num_workers if tc.strategy == "fsdp" else 1)
    if packed.train_rows < tc.batch_size:
        raise ValueError(f"{packed.train_rows} packed training rows of {cfg.data.seq_len + 1} tokens: fewer than one "
                         f"batch (train.batch_size {tc.batch_size}); more text or a shorter data.seq_len")
    plan = Plan.make(cfg.stages, tc.num_workers * tc.batch_size * cfg.data.seq_len)
    if tc.strategy == "fsdp" and plan.steps["align"]:
        raise ValueError("stage align needs train.strategy: ddp (FSDP shards the layers it calls one by one)")
    if tc.strategy == "fsdp" and cfg.stages.weighting == "auto":
        raise ValueError("stages.weighting: auto needs train.strategy: ddp (its log-variances are set in place at "
                         "each stage's start, which FSDP's flattened shards do not allow)")
    if plan.steps["align"] and cfg.student.arch == "hybrid":
        from app.distill.student import attention_layer_indices

        if len(attention_layer_indices(cfg.student.attention_layers, teacher_cfg.num_hidden_layers)) == \
                teacher_cfg.num_hidden_layers:
            raise ValueError("stage align has nothing to align: the student keeps every attention layer "
                             "(stages.align_tokens: 0, or fewer student.attention_layers)")
    if tc.memory_check:
        from app.distill.memory import check_fits

        check_fits(cfg, teacher_cfg)
    key = run_key(cfg, packed, plan)
    _check_rerun(out, key)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(key, f, indent=1)
    topk = None
    if cfg.cache.teacher_topk:
        from app.distill.cache import teacher_topk_cache

        topk = teacher_topk_cache(cfg, packed, out)
    log.info("plan: %s steps (%d tokens per step, %d workers)", plan.steps, plan.tokens_per_step, tc.num_workers)
    return Prepared(cfg, packed, plan, topk, key, teacher_cfg)


def trainer(prep: Prepared, callbacks: tuple = ()):
    """The run's ``TorchTrainer``: run "train" under OUTPUT/ray, so a rerun into the same output directory
    restores from the run's last checkpoint (Ray Train v2 restores a run by name and storage path)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from app.config import to_dict
    from app.distill.backend import NodeBoundTorchConfig

    cfg, tc = prep.cfg, prep.cfg.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "plan": prep.plan.__dict__, "data": prep.packed.to_dict(),
                           "output": cfg.output, "topk": prep.topk, "run_key": prep.key},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
        torch_config=NodeBoundTorchConfig(),  # the process group listens on the node's Ray address only
        run_config=RunConfig(name="train", storage_path=os.path.join(cfg.output, "ray"),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             callbacks=list(callbacks)),
    )


def distill(cfg, *, callbacks: tuple = (), export: bool = True) -> dict:
    """Run a distillation (see the module doc); returns the final metrics and where the student went.
    ``callbacks``: Ray Train callbacks (a Tune trial passes TuneReportCallback); ``export``: copy the student
    out of the last checkpoint with the tokenizer (else ``student`` is the checkpoint's copy)."""
    from app.models import load_tokenizer

    prep = prepare(cfg)
    out = prep.cfg.output
    result = trainer(prep, callbacks).fit()
    if result.error is not None:
        raise result.error
    final = dict(result.metrics or {})
    if export:
        student_dir = os.path.join(out, "student")
        with result.checkpoint.as_directory() as d:
            if os.path.isdir(student_dir):
                shutil.rmtree(student_dir)
            shutil.copytree(os.path.join(d, "student"), student_dir)
        load_tokenizer(prep.cfg.teacher).save_pretrained(student_dir)
        final["student"] = student_dir
    else:
        final["student"] = os.path.join(result.checkpoint.path, "student")
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(final, f, indent=1, default=str)
    return final
