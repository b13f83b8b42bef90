"""Ray Tune over distillation: Optuna proposes loss weights, temperature, stage split and learning rate; ASHA
stops the weak trials early; the metric is the student's held-out perplexity.

Ray 2.60's Train + Tune pattern: each Tune trial runs a driver function (``_trial``, no CPU of its own) that
starts a ``TorchTrainer`` (``app.distill.train.trainer``) with ``TuneReportCallback``, so every
``ray.train.report`` of the workers (every ``report_every`` steps: held-out evaluation + checkpoint) reaches
Tune. ASHA's clock is the training step (``time_attr="step"``), which stays right when a trial resumes from
its checkpoint.

The data is tokenized and packed once, and the teacher's top-k cache (``distill.cache.teacher_topk``) is
computed once, before the sweep, in a cache directory that all trials share.

Layout of OUTPUT:
    tune/                Ray Tune's experiment: per-trial results, TensorBoard logs (tensorboard --logdir
                         OUTPUT/tune), the searcher's state; an interrupted sweep resumes from it
    trials/TRIAL_ID/     each trial's distillation run (config.yaml, metrics.jsonl, tensorboard/, ray/)
    best.yaml            the best trial's full distill config: ``python jobs/distill.py --config best.yaml``
    trials.csv           every trial: its values, last step, held-out perplexity, status
    best.json            the best trial's id, values and metrics
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import os

log = logging.getLogger(__name__)

METRIC = "eval_student_ppl"
# The trial's driver function only waits on its TorchTrainer (whose workers hold the CPUs/GPUs). Tune refuses
# an empty resource request, so it asks for one byte of memory: no CPU, so N trials need N x workers CPUs.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
_STAGE_KEYS = ("align_tokens", "kd_tokens", "ce_tokens")


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C, SIGTERM) with trials unfinished; running it again resumes it."""


def finished_or_raise(expected: int, exp: str) -> None:
    """Raise SweepInterrupted unless all ``expected`` trials ended (finished, stopped early or failed) in the
    experiment state saved at ``exp``. (After Ctrl-C, Tune's in-memory trials read TERMINATED although the
    saved state, which a restore resumes, keeps them PENDING.)"""
    from ray.tune import ExperimentAnalysis

    statuses = [t.status for t in ExperimentAnalysis(exp).trials]
    done = sum(st in ("TERMINATED", "ERROR") for st in statuses)
    if done < expected:
        raise SweepInterrupted(f"interrupted with {done} of {expected} trials ended; run the same command again to "
                               f"resume the sweep in {exp}")


def apply_params(cfg, params: dict):
    """A copy of DistillConfig ``cfg`` with a trial's values (keys of SpaceConfig) applied. The stage split is
    rounded to whole steps, so every trial runs the base's number of steps."""
    cfg = copy.deepcopy(cfg)
    st = cfg.stages
    per_step = cfg.train.num_workers * cfg.train.batch_size * cfg.data.seq_len
    steps = sum(math.ceil(getattr(st, k) / per_step) for k in _STAGE_KEYS)
    for k in ("temperature", "kd_ce_weight", "align_weight"):
        if k in params:
            setattr(st, k, float(params[k]))
    if "align_share" in params or "ce_share" in params:
        total = sum(getattr(st, k) for k in _STAGE_KEYS)
        a = params.get("align_share", st.align_tokens / total)
        c = params.get("ce_share", st.ce_tokens / total)
        if a + c > 1:
            a, c = a / (a + c), c / (a + c)
        sa, sc = int(round(a * steps)), int(round(c * steps))
        st.align_tokens, st.ce_tokens, st.kd_tokens = sa * per_step, sc * per_step, (steps - sa - sc) * per_step
    if "lr" in params:
        cfg.train.lr = float(params["lr"])
    if "init" in params:
        cfg.student.init = params["init"]
    if "attention_layers" in params:
        cfg.student.attention_layers = params["attention_layers"]
    return cfg


def param_space(space) -> dict:
    from ray import tune

    out = {}
    for f in dataclasses.fields(space):
        r = getattr(space, f.name)
        if r is None:
            continue
        if f.name in ("init", "attention_layers"):
            out[f.name] = tune.choice(list(r))
        elif r.low == r.high:
            out[f.name] = r.low
        else:
            out[f.name] = (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
    return out


def _trial(params: dict, base: dict, root: str, report_every: int) -> None:
    """One trial (a Tune function trainable): the base config with ``params``, run on Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from app.config import _build
    from app.distill.config import DistillConfig
    from app.distill.train import distill

    cfg = apply_params(_build(DistillConfig, base), params)
    cfg.output = os.path.join(root, "trials", tune.get_context().get_trial_id())
    cfg.train.eval_every = cfg.train.checkpoint_every = report_every
    distill(cfg, callbacks=(TuneReportCallback(),), export=False)


def trial_concurrency(explicit, train_cfg) -> int:
    """``explicit``, or as many trials as the cluster's CPUs (GPUs) hold at ``train_cfg.num_workers`` each."""
    import ray

    if explicit:
        return explicit
    have = ray.cluster_resources().get("GPU" if train_cfg.use_gpu else "CPU", 1)
    return max(1, int(have // train_cfg.num_workers))


def memory_concurrency(cfg, teacher_cfg, wanted: int, explicit: bool, choices=None) -> int:
    """How many trials of ``cfg`` may run at once by memory (``wanted`` by CPUs/GPUs or as asked): the largest
    that fits every node's budget (app/distill/memory.py). An explicit ``max_concurrent_trials`` that does not fit
    is refused; the automatic one is lowered, and the log says so. ``choices``: the searched attention layers
    (every one is checked; the stage split does not change the peak, which is stage kd's)."""
    from app.distill.memory import check_fits

    if not cfg.train.memory_check:
        return wanted
    variants = [cfg]
    for choice in choices or []:  # each searched student: the biggest must fit
        v = copy.deepcopy(cfg)
        v.student.attention_layers = choice
        variants.append(v)
    for k in range(wanted, 0, -1):
        try:
            for v in variants:
                check_fits(v, teacher_cfg, concurrent_runs=k)
        except ValueError as e:
            if explicit and k == wanted:
                raise ValueError(f"max_concurrent_trials {wanted}: {e}") from e
            if k == 1:
                raise
            continue
        if k < wanted:
            log.warning("memory: %d trials at once fit, not %d; running %d at a time", k, wanted, k)
        return k
    return 1


def tune_distill(tcfg) -> dict:
    """Run (or resume) the sweep; returns {"best": {...}, "trials": [...], "best_config": path, "resumed": bool}."""
    import yaml
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from app.config import to_dict
    from app.distill.data import check_eval_split
    from app.distill.train import absolute_paths, prepare

    out = os.path.abspath(tcfg.output)
    os.makedirs(out, exist_ok=True)
    base = absolute_paths(tcfg.distill)
    base.data.cache_dir = base.data.cache_dir or os.path.join(out, "cache")
    base.output = os.path.join(out, "base")
    with open(os.path.join(out, "tune_config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(tcfg), f, sort_keys=False)
    prep = prepare(base)  # pack the data and compute the top-k cache once, for every trial
    check_eval_split(prep.packed, base.data)  # the metric is held-out perplexity: refused now, not in every trial
    total_steps = prep.plan.total
    concurrency = memory_concurrency(base, prep.teacher_cfg,
                                     trial_concurrency(tcfg.max_concurrent_trials, tcfg.distill.train),
                                     explicit=bool(tcfg.max_concurrent_trials), choices=tcfg.space.attention_layers)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), root=out, report_every=tcfg.report_every), DRIVER_RESOURCES)
    exp = os.path.join(out, "tune")
    resumed = tune.Tuner.can_restore(exp)
    if resumed:
        log.info("resuming the sweep in %s", exp)
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=True)
    else:
        # max_t one past the last step: ASHA stops only the weak trials; one that reaches its budget ends on its
        # own (a stop at max_t would kill it while its trainer is still shutting down)
        scheduler = (ASHAScheduler(time_attr="step", max_t=total_steps + 1,
                                   grace_period=min(total_steps, tcfg.asha.grace_period * tcfg.report_every),
                                   reduction_factor=tcfg.asha.reduction_factor)
                     if tcfg.asha.enabled else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space(tcfg.space),
            tune_config=tune.TuneConfig(metric=METRIC, mode="min", search_alg=OptunaSearch(seed=tcfg.seed),
                                        scheduler=scheduler, num_samples=tcfg.num_samples,
                                        max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name="tune", storage_path=out),
        )
    grid = tuner.fit()
    finished_or_raise(tcfg.num_samples, exp)
    trials = []
    for r in grid:
        m = r.metrics or {}
        trials.append({"trial_id": m.get("trial_id") or os.path.basename(r.path), "params": r.config,
                       "step": m.get("step"), METRIC: m.get(METRIC), "eval_loss": m.get("eval_loss"),
                       "status": "error" if r.error else ("complete" if m.get("step") == total_steps else "stopped"),
                       "error": str(r.error) if r.error else None})
    ok = [t for t in trials if t[METRIC] is not None and math.isfinite(t[METRIC]) and t["status"] != "error"]
    if not ok:
        raise RuntimeError(f"no trial finished with a held-out perplexity; errors: "
                           f"{[t['error'] for t in trials if t['error']][:3]}")
    full = [t for t in ok if t["status"] == "complete"]
    best = min(full or ok, key=lambda t: t[METRIC])  # a trial stopped early is compared only when none finished
    best_cfg = apply_params(tcfg.distill, best["params"])
    best_cfg.output = os.path.join(out, "best")
    best_cfg.data.cache_dir = base.data.cache_dir  # the sweep's packed data (and top-k cache)
    best_path = os.path.join(out, "best.yaml")
    with open(best_path, "w") as f:
        f.write(f"# best of {len(trials)} trials ({best['trial_id']}: held-out perplexity {best[METRIC]:.4g} at "
                f"step {best['step']}/{total_steps}); run it with: python jobs/distill.py --config {best_path}\n")
        yaml.safe_dump(to_dict(best_cfg), f, sort_keys=False)
    keys = sorted({k for t in trials for k in t["params"]})
    with open(os.path.join(out, "trials.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", *keys, "step", METRIC, "eval_loss", "status"])
        for t in sorted(trials, key=lambda t: t["trial_id"]):
            w.writerow([t["trial_id"], *[t["params"].get(k) for k in keys], t["step"], t[METRIC], t["eval_loss"],
                        t["status"]])
    with open(os.path.join(out, "best.json"), "w") as f:
        json.dump(best, f, indent=1, default=str)
    return {"best": best, "trials": trials, "best_config": best_path, "resumed": resumed, "total_steps": total_steps}
