"""The IsoFLOP sweep: a Ray Tune grid of student sizes x token counts at several compute budgets, then both
Chinchilla fits (``chinchilla.py``) on the runs.

For each budget C and each student size (hidden size x layers, Mamba-2, randomly initialised), the run's
token count is D = C / (training FLOPs per token) with the exact count of ``flops.py`` (or C / 6N), rounded
to whole steps; a pair that gets fewer than ``min_steps`` steps is left out. Each run trains on the refined
corpus with the plain LM loss (``mode: lm``, stage ce) or by distillation from the teacher (``mode: distill``,
stage kd); its loss is the held-out cross-entropy at the end. The learning rate decays (cosine) over each
run's own length, as in Chinchilla.

Each trial drives a ``TorchTrainer`` (``app.distill.train``) as the distillation sweep does; an interrupted
sweep resumes from OUTPUT/tune. Output:
    runs.parquet     N (parameters), N_non_embedding, D (tokens), FLOPs (exact), FLOPs_6ND, budget, loss,
                     hidden_size, num_layers, trial: fit again offline with ``distillery scaling fit``
    scaling.json, report.html, *.png     the fits, N* and D* at the target budgets with intervals, plots
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from app.config import _check
from app.distill.config import DistillConfig

log = logging.getLogger(__name__)


@dataclass
class SizeConfig:
    hidden_size: int
    """Student width d."""
    num_layers: int
    """Student depth."""

    def __post_init__(self) -> None:
        _check(self.hidden_size >= 1 and self.num_layers >= 1, "sizes", "hidden_size and num_layers must be >= 1")


def cpu_sized_base() -> DistillConfig:
    """The default base run: small students a 2-core CPU trains in minutes (sequences of 64, one worker of
    batch 4 per trial, SSM heads of 16, lr 1e-2, held-out loss on 32 batches), randomly initialised."""
    from app.distill.config import DataConfig, StagesConfig, StudentConfig, TrainConfig

    return DistillConfig(data=DataConfig(seq_len=64),
                         student=StudentConfig(arch="mamba2", attention_layers=0, init="random", head_dim=16,
                                               state_size=16),
                         stages=StagesConfig(align_tokens=0, kd_tokens=200_000),  # each grid point sets its own
                         train=TrainConfig(num_workers=1, batch_size=4, lr=1e-2, warmup_steps=5, checkpoint_every=200,
                                           eval_batches=32, eval_teacher=False))


@dataclass
class ScalingSweepConfig:
    distill: DistillConfig = field(default_factory=cpu_sized_base)
    """The base run: teacher (its tokenizer and vocabulary; the teacher itself in mode distill), data, the SSM
    shape (student.head_dim, state_size, ...), batch size, learning rate, workers per trial."""
    output: str = "out/scaling"
    """Sweep directory (see the module doc)."""
    mode: Literal["lm", "distill"] = "lm"
    """lm: next-token cross-entropy; distill: KD from the teacher (stage kd)."""
    sizes: list[SizeConfig] = field(default_factory=lambda: [SizeConfig(16, 1), SizeConfig(32, 1), SizeConfig(48, 2),
                                                             SizeConfig(64, 2), SizeConfig(96, 3)])
    """Student sizes tried at every budget."""
    budgets: list[float] = field(default_factory=lambda: [2.5e11, 6e11, 1.5e12])
    """Training FLOPs of each IsoFLOP profile (at least 3)."""
    targets: list[float] = field(default_factory=list)
    """Budgets to report N* and D* for (empty: 10x the largest budget)."""
    flops: Literal["exact", "6nd"] = "exact"
    """How a budget becomes tokens: the exact per-layer count, or C = 6 N D."""
    min_steps: int = 4
    """Leave out (size, budget) pairs with fewer training steps."""
    max_concurrent_trials: Optional[int] = None
    """Trials at once (null: as many as the cluster's CPUs, or GPUs, fit at train.num_workers each)."""
    bootstrap: int = 100
    """Bootstrap resamples for the intervals (0: none)."""
    fit_top_inits: Optional[int] = None
    """Start the Approach 3 fit from the K best grid points only (null: all 4,500, as the paper)."""

    def __post_init__(self) -> None:
        _check(len(self.budgets) >= 3, "budgets", "an IsoFLOP fit needs at least 3 budgets")
        _check(all(b > 0 for b in self.budgets), "budgets", "must be > 0")
        _check(len(self.sizes) >= 3, "sizes", "a parabola per budget needs at least 3 sizes")
        _check(self.min_steps >= 1, "min_steps", "must be >= 1")
        _check(self.bootstrap >= 0, "bootstrap", "must be >= 0")
        _check(self.distill.student.arch == "mamba2", "distill.student.arch",
               "the sweep's students are pure Mamba-2 of the sizes listed: set it to mamba2")


def plan_runs(scfg, teacher_config) -> list[dict]:
    """The grid: one dict per (budget, size) with its shape, N, D, steps and FLOPs."""
    from app.distill.student import student_config
    from app.scaling.flops import flops_per_token, params, shape_of, training_flops

    base = scfg.distill
    seq = base.data.seq_len
    per_step = base.train.num_workers * base.train.batch_size * seq
    runs = []
    for budget in scfg.budgets:
        for size in scfg.sizes:
            shape = dataclasses.replace(base.student.shape(), hidden_size=size.hidden_size, num_layers=size.num_layers)
            fshape = shape_of(student_config(teacher_config, shape))
            n = params(fshape)
            per_token = flops_per_token(fshape, seq) if scfg.flops == "exact" else 6.0 * n["total"]
            steps = int(round(budget / per_token / per_step))
            if steps < scfg.min_steps:
                log.info("budget %.3g, size %s: %d steps < min_steps, left out", budget, size, steps)
                continue
            d = steps * per_step
            runs.append({"budget": float(budget), "hidden_size": size.hidden_size, "num_layers": size.num_layers,
                         "N": n["total"], "N_non_embedding": n["non_embedding"], "D": d, "steps": steps,
                         "FLOPs": training_flops(fshape, d, seq), "FLOPs_6ND": 6.0 * n["total"] * d})
    return runs


def run_config(base: DistillConfig, run: dict, mode: str) -> DistillConfig:
    """The distill config of one grid point."""
    cfg = copy.deepcopy(base)
    cfg.student.init = "random"
    cfg.student.hidden_size, cfg.student.num_layers = run["hidden_size"], run["num_layers"]
    st = cfg.stages
    st.align_tokens, st.kd_tokens, st.ce_tokens = 0, 0, 0
    if mode == "lm":
        st.ce_tokens = run["D"]
        cfg.train.eval_teacher = False
    else:
        st.kd_tokens = run["D"]
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, run["steps"] // 5)
    cfg.train.eval_every = 0  # held-out loss at the end only
    return cfg


def _trial(params: dict, base: dict, root: str, mode: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from app.config import _build
    from app.distill.train import distill

    run = params["run"]
    cfg = run_config(_build(DistillConfig, base), run, mode)
    cfg.output = os.path.join(root, "trials", run["name"])
    distill(cfg, callbacks=(TuneReportCallback(),), export=False)


def sweep(scfg) -> dict:
    """Run (or resume) the sweep, write runs.parquet and the fit report; returns the analysis."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from ray import tune

    from app.config import to_dict
    from app.distill.train import absolute_paths, prepare
    from app.distill.tune import DRIVER_RESOURCES, finished_or_raise, trial_concurrency
    from app.models import load_model_config
    from app.scaling.analysis import analyze, runs_from_columns, write_report

    out = os.path.abspath(scfg.output)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scaling_config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(scfg), f, sort_keys=False)
    base = absolute_paths(scfg.distill)
    base.data.cache_dir = base.data.cache_dir or os.path.join(out, "cache")
    runs = plan_runs(scfg, load_model_config(base.teacher))
    for r in runs:
        r["name"] = f"C{r['budget']:.3g}-d{r['hidden_size']}-l{r['num_layers']}"
    per_budget = {b: sum(r["budget"] == b for r in runs) for b in scfg.budgets}
    if sum(v >= 3 for v in per_budget.values()) < 3:
        raise ValueError(f"runs per budget {per_budget}: fewer than 3 budgets keep 3 sizes with >= min_steps "
                         f"steps; raise the budgets or lower min_steps / train.batch_size")
    first = run_config(base, runs[0], scfg.mode)
    first.output = os.path.join(out, "base")
    prepare(first)  # pack the data (and a top-k cache) once, before the trials
    trainable = tune.with_resources(tune.with_parameters(_trial, base=to_dict(base), root=out, mode=scfg.mode),
                                    DRIVER_RESOURCES)
    exp = os.path.join(out, "tune")
    if tune.Tuner.can_restore(exp):
        log.info("resuming the sweep in %s", exp)
        tuner = tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={"run": tune.grid_search(runs)},
                           tune_config=tune.TuneConfig(
                               max_concurrent_trials=trial_concurrency(scfg.max_concurrent_trials, base.train)),
                           run_config=tune.RunConfig(name="tune", storage_path=out))
    grid = tuner.fit()
    finished_or_raise(len(runs), exp)
    rows, errors = [], []
    for r in grid:
        run = r.config["run"]
        loss = (r.metrics or {}).get("eval_loss")
        if r.error or loss is None:
            errors.append(f"{run['name']}: {r.error}")
            continue
        rows.append({**{k: run[k] for k in ("N", "N_non_embedding", "D", "FLOPs", "FLOPs_6ND", "budget",
                                             "hidden_size", "num_layers", "steps")},
                     "loss": float(loss), "trial": run["name"]})
    if errors:
        log.warning("%d runs failed: %s", len(errors), "; ".join(errors[:5]))
    rows.sort(key=lambda r: (r["budget"], r["N"]))
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]}) if rows else None
    if table is None:
        raise RuntimeError(f"no run finished: {errors[:3]}")
    pq.write_table(table, os.path.join(out, "runs.parquet"))
    data = runs_from_columns({k: table.column(k).to_numpy(zero_copy_only=False)
                              for k in ("N", "D", "FLOPs", "loss", "budget")})
    targets = scfg.targets or [10 * max(scfg.budgets)]
    result = analyze(data, targets, bootstrap=scfg.bootstrap, top_inits=scfg.fit_top_inits)
    result["paths"] = write_report(data, result, out)
    result["failed"] = errors
    result["runs_table"] = os.path.join(out, "runs.parquet")
    return result


def fit_file(path: str, targets: list[float], out_dir: Optional[str], bootstrap: int = 100,
             workers: Optional[int] = None, top_inits: Optional[int] = None) -> dict:
    """``distillery scaling fit``: both fits on a runs table (Parquet or CSV)."""
    from app.scaling.analysis import analyze, load_runs, write_report

    data = load_runs(path)
    if not targets:
        targets = [10 * float(data["FLOPs"].max())]
    result = analyze(data, targets, bootstrap=bootstrap, workers=workers, top_inits=top_inits)
    if out_dir:
        result["paths"] = write_report(data, result, out_dir)
    return result

