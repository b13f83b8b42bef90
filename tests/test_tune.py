"""Ray Tune over distillation (Optuna + ASHA driving TorchTrainer) and the IsoFLOP scaling sweep, on tiny
models on CPU: end to end, a valid best-config YAML, and a sweep interrupted (SIGINT) then restored finishes
with every trial."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny_models import WORDS, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(n, seed=0):
    """Learnable text: runs of the tiny vocabulary in order, from random starting words."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(WORDS))
        out.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("tune")
    teacher = tiny_llama(str(root / "teacher"))
    texts = _texts(200)
    os.makedirs(root / "kept")
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), root / "kept" / "p.parquet")
    return {"teacher": teacher, "data": str(root / "kept"), "cache": str(root / "cache")}


def _tune_sets(setup, out, samples=4):
    return [f"output={out}", f"num_samples={samples}", "report_every=2", "max_concurrent_trials=2",
            f"distill.teacher={setup['teacher']}", f"distill.data.input={setup['data']}",
            f"distill.data.cache_dir={setup['cache']}", "distill.data.seq_len=32", "distill.data.eval_fraction=0.1",
            "distill.stages.kd_tokens=768", "distill.stages.align_tokens=0", "distill.stages.ce_tokens=0",
            "distill.train.num_workers=1", "distill.train.batch_size=4", "distill.train.eval_batches=2",
            "distill.train.warmup_steps=1", "distill.train.max_failures=1", "distill.student.init=random",
            "space.align_share=null", "space.init=[attention, random]", "space.attention_layers=['0', '1/2']"]


def test_apply_params_splits_the_budget_in_whole_steps():
    from app.config import load_config
    from app.distill.config import DistillConfig
    from app.distill.tune import apply_params

    base = load_config(DistillConfig, None, ["stages.kd_tokens=1000", "stages.align_tokens=0", "data.seq_len=10",
                                             "train.batch_size=5", "train.num_workers=2"])  # 100 tokens per step
    cfg = apply_params(base, {"align_share": 0.2, "ce_share": 0.1, "temperature": 3.0, "lr": 1e-3})
    assert (cfg.stages.align_tokens, cfg.stages.kd_tokens, cfg.stages.ce_tokens) == (200, 700, 100)
    assert cfg.stages.temperature == 3.0 and cfg.train.lr == 1e-3
    assert base.stages.kd_tokens == 1000  # the base is left alone
    odd = apply_params(base, {"align_share": 0.23, "ce_share": 0.06})  # rounded to whole steps, same total
    assert (odd.stages.align_tokens, odd.stages.kd_tokens, odd.stages.ce_tokens) == (200, 700, 100)
    over = apply_params(base, {"align_share": 0.8, "ce_share": 0.4})  # shares over 1 are scaled down
    assert over.stages.kd_tokens == 0 and over.stages.align_tokens + over.stages.ce_tokens == 1000


def test_a_sweep_interrupted_and_restored_finishes_every_trial_and_writes_a_valid_best_config(ray_local, setup,
                                                                                               tmp_path):
    """The job runs in a subprocess joined to the test's Ray; SIGINT (Ctrl-C) stops it once one trial has
    finished; running it again with the same output restores the sweep (Tuner.restore), which ends with all
    trials (ASHA on: some may be stopped early) and writes a best config the distill job takes as is."""
    from app.config import load_config
    from app.distill.config import DistillConfig, TuneDistillConfig
    from app.distill.tune import METRIC, apply_params, tune_distill

    out = tmp_path / "sweep"
    sets = _tune_sets(setup, out, samples=3)
    args = [sys.executable, os.path.join(ROOT, "jobs", "tune_distill.py")] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [d for d in (os.listdir(out / "trials") if (out / "trials").is_dir() else [])
                    if os.path.isfile(out / "trials" / d / "result.json")]
            if done:
                break
            time.sleep(0.5)
        assert proc.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130  # "interrupted ...; run the same command again to resume"
    finally:
        if proc.poll() is None:
            proc.kill()
    finished_first = [d for d in os.listdir(out / "trials") if os.path.isfile(out / "trials" / d / "result.json")]
    assert 1 <= len(finished_first) < 3, finished_first  # interrupted with trials left
    assert not os.path.exists(out / "best.yaml")

    cfg = load_config(TuneDistillConfig, None, sets)
    res = tune_distill(cfg)
    assert res["resumed"]
    trials = res["trials"]
    assert len(trials) == 3 and not any(t["error"] for t in trials), trials
    assert {t["trial_id"] for t in trials} >= set(finished_first)
    assert res["total_steps"] == 6  # 768 tokens / (4 x 32) per step
    assert any(t["status"] == "complete" for t in trials) and all(t[METRIC] > 0 for t in trials)
    assert len({round(t["params"]["lr"], 12) for t in trials}) == 3  # Optuna proposed different values
    for t in trials:  # each trial's own run log: held-out evaluations every 2 steps, the last one reported
        with open(out / "trials" / t["trial_id"] / "metrics.jsonl") as f:
            evals = [json.loads(line) for line in f if "eval_student_ppl" in line]
        at = [e for e in evals if e["step"] == t["step"]]  # (a stopped trial may log a step past its last report)
        assert at and at[-1]["eval_student_ppl"] == pytest.approx(t[METRIC])
    best = min((t for t in trials if t["status"] == "complete"), key=lambda t: t[METRIC])
    assert res["best"]["trial_id"] == best["trial_id"]
    # the YAML is a complete distill config the distill job takes as is, with the best trial's values
    loaded = load_config(DistillConfig, res["best_config"])
    want = apply_params(cfg.distill, best["params"])
    assert loaded.stages == want.stages and loaded.train.lr == pytest.approx(best["params"]["lr"])
    assert loaded.student.init == best["params"]["init"]
    assert loaded.student.attention_layers == best["params"]["attention_layers"] in ("0", "1/2")
    assert sum((loaded.stages.align_tokens, loaded.stages.kd_tokens, loaded.stages.ce_tokens)) == 768
    with open(out / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert any("events.out.tfevents" in n for _, _, fs in os.walk(out / "tune") for n in fs)  # the Tune dashboard
