"""Chinchilla scaling: FLOP and parameter counts against hand counts and torch's FLOP counter, the Approach 3
fit against known parameters (noisy and exact data, two initialisation grids), the IsoFLOP fit against a known
optimum, runs tables and the CLI, and the scaling sweep on Ray Tune with tiny students."""

import json
import math
import os

import numpy as np
import pytest

from app.scaling.chinchilla import ParametricFit

CHINCHILLA = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def _fwd_counted(model, x):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # parameters frozen: FlopCounterMode's module tracker hooks the gradients of every tensor that needs one,
    # and fails on the no-grad weight view that transformers 5.25's kernels-wrapped causal_conv1d_fn receives
    model.requires_grad_(False)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


def test_llama_counts_match_hand_counts_and_torch_flop_counter():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.scaling.flops import forward_flops, params, shape_of, training_flops

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    s = shape_of(cfg)
    t, d, v, f, layers = 16, 32, 100, 64, 2
    hand = {  # Appendix F, one sequence of 16 tokens; heads 4 x 8, KV heads 2 x 8
        "embeddings": 2 * t * v * d,
        "qkv": layers * 2 * t * d * (4 + 2 * 2) * 8,
        "attn_logits": layers * 2 * t * t * 4 * 8,
        "softmax": layers * 3 * 4 * t * t,
        "attn_values": layers * 2 * t * t * 4 * 8,
        "attn_out": layers * 2 * t * 4 * 8 * d,
        "mlp": layers * 2 * t * d * f * 3,
        "logits": 2 * t * d * v,
    }
    got = forward_flops(s, t)
    assert {k: got[k] for k in hand} == hand and got["total"] == sum(hand.values())
    assert training_flops(s, tokens=5 * t, seq_len=t) == 3 * 5 * got["total"]
    torch.manual_seed(0)
    for tied in (False, True):
        cfg.tie_word_embeddings = tied
        model = LlamaForCausalLM(cfg).eval()
        p = params(shape_of(cfg))
        assert p["total"] == model.num_parameters()
        assert p["non_embedding"] == model.num_parameters() - v * d * (1 if tied else 2)
    counted = _fwd_counted(model, torch.randint(0, v, (1, t)))  # matmuls only: no lookup, no softmax
    assert sum(counted.values()) == got["total"] - got["embeddings"] - got["softmax"]


def test_mamba2_counts_match_hand_counts_and_the_torch_path():
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from app.scaling.flops import forward_flops, params, shape_of

    cfg = Mamba2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=8, state_size=8,
                       n_groups=2, expand=1, conv_kernel=4, chunk_size=8, tie_word_embeddings=False)
    s = shape_of(cfg)
    t, d, v, layers, q, n, p, h, g, k = 16, 32, 100, 2, 8, 8, 8, 4, 2, 4
    di = h * p
    hand = {
        "in_proj": layers * 2 * t * d * (2 * di + 2 * g * n + h),
        "conv": layers * 2 * t * (di + 2 * g * n) * k,
        "ssd_cb": layers * 2 * t * q * n * g,
        "ssd_intra": layers * 2 * t * q * p * h,
        "ssd_states": layers * 2 * t * n * p * h,
        "ssd_passing": layers * 2 * (t // q) * n * p * h,
        "ssd_out": layers * 2 * t * n * p * h,
        "out_proj": layers * 2 * t * di * d,
        "logits": 2 * t * d * v,
    }
    got = forward_flops(s, t)
    assert {key: got[key] for key in hand} == hand
    torch.manual_seed(0)
    for tied in (False, True):
        cfg.tie_word_embeddings = tied
        model = Mamba2ForCausalLM(cfg).eval()
        assert params(shape_of(cfg))["total"] == model.num_parameters()
    counted = _fwd_counted(model, torch.randint(0, v, (1, t)))
    # transformers' torch path: the same projections and SSD matmuls, except that it computes C Bᵀ per head
    # (B and C repeated from their groups), passes states between chunks with a (chunks + 1)^2 matmul where
    # the kernel scans, and counts the conv over T + K - 1 outputs
    chunks = t // q
    torch_passing = layers * 2 * (chunks + 1) ** 2 * h * p * n
    torch_cb = layers * 2 * t * q * n * h
    assert counted["aten.mm"] + counted["aten.bmm"] == (got["total"] - got["embeddings"] - got["conv"]
                                                         - got["ssd_passing"] + torch_passing
                                                         - got["ssd_cb"] + torch_cb)
    assert counted["aten.convolution"] == layers * 2 * (t + k - 1) * (di + 2 * g * n) * k


def _synthetic(law, n_runs, noise, seed):
    rng = np.random.default_rng(seed)
    n = 10 ** rng.uniform(7.5, 10.5, n_runs)
    d = 10 ** rng.uniform(9, 12, n_runs)
    loss = law.predict(n, d) * np.exp(rng.normal(0, noise, n_runs))
    return n, d, loss


SHIFTED_GRID = {"alpha": (0.25, 0.75, 1.25), "beta": (0.25, 0.75, 1.25), "e": (-0.75, 0.25, 0.75),
                "a": (2.5, 7.5, 12.5), "b": (2.5, 7.5, 12.5)}


def test_approach3_recovers_known_parameters_whatever_the_grid():
    from app.scaling.chinchilla import CHINCHILLA_GRID, fit_parametric

    n, d, loss = _synthetic(CHINCHILLA, 40, 0.0, seed=0)  # exact data: the parameters themselves
    exact = fit_parametric(n, d, loss, grid={k: v[::2] for k, v in CHINCHILLA_GRID.items()}, workers=2)
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(exact, k) == pytest.approx(getattr(CHINCHILLA, k), rel=1e-3), k
    n, d, loss = _synthetic(CHINCHILLA, 60, 0.01, seed=1)  # 1% multiplicative noise
    paper = fit_parametric(n, d, loss, workers=2)  # the paper's 4,500 starting points
    assert paper.inits == 4500
    shifted = fit_parametric(n, d, loss, grid=SHIFTED_GRID, workers=2)
    for k in ("E", "A", "B", "alpha", "beta"):  # the same minimum from another grid
        assert getattr(shifted, k) == pytest.approx(getattr(paper, k), rel=1e-4), k
    assert abs(paper.alpha - CHINCHILLA.alpha) < 0.03 and abs(paper.beta - CHINCHILLA.beta) < 0.03
    assert paper.E == pytest.approx(CHINCHILLA.E, rel=0.05)
    want, got = CHINCHILLA.optimal(1e24), paper.optimal(1e24)
    assert got["N"] == pytest.approx(want["N"], rel=0.5) and got["loss"] == pytest.approx(want["loss"], rel=0.01)


def test_bootstrap_intervals_cover_the_truth():
    from app.scaling.chinchilla import bootstrap_parametric, fit_parametric, interval

    n, d, loss = _synthetic(CHINCHILLA, 80, 0.01, seed=2)
    fit = fit_parametric(n, d, loss, grid=SHIFTED_GRID, workers=1)
    boots = bootstrap_parametric(n, d, loss, samples=40, seed=0, grid=SHIFTED_GRID, fit=fit, workers=2)
    assert len(boots) == 40
    for k in ("alpha", "beta", "E"):
        lo, hi = interval([getattr(b, k) for b in boots])
        assert lo < getattr(CHINCHILLA, k) < hi and lo < getattr(fit, k) < hi, (k, lo, hi)
    again = bootstrap_parametric(n, d, loss, samples=8, seed=0, grid=SHIFTED_GRID, fit=fit, workers=1)
    assert [b.alpha for b in again] == pytest.approx([b.alpha for b in boots[:8]])  # seeded: workers do not matter


def test_optimal_allocation_is_the_constrained_minimum():
    budget = 5.76e23  # Chinchilla's budget
    opt = CHINCHILLA.optimal(budget)
    assert 6 * opt["N"] * opt["D"] == pytest.approx(budget)
    for f in (0.8, 1.25):  # any other split of the same compute has a higher predicted loss
        n = opt["N"] * f
        assert CHINCHILLA.predict(n, budget / (6 * n)) > opt["loss"]


def test_isoflop_fit_finds_a_known_optimum():
    from app.scaling.chinchilla import fit_isoflop

    # profiles exactly parabolic in ln N with the vertex at N* = 0.1 C^0.5 (and D = C / 6N)
    rows = []
    for c in (1e18, 1e19, 1e20, 1e21):
        n_star = 0.1 * c ** 0.5
        for n in n_star * np.geomspace(0.2, 4, 7):
            rows.append((n, c / (6 * n), c, 2.0 + 0.05 * math.log(n / n_star) ** 2 - 0.1 * math.log10(c)))
    n, d, c, loss = map(np.array, zip(*rows))
    fit = fit_isoflop(n, d, c, loss)
    assert len(fit.profiles) == 4 and all(p.used and p.inside for p in fit.profiles)
    assert fit.n_exponent == pytest.approx(0.5, abs=1e-6) and fit.n_coef == pytest.approx(0.1, rel=1e-5)
    assert fit.d_exponent == pytest.approx(0.5, abs=1e-6)
    o = fit.optimal(1e23)
    assert o["N"] == pytest.approx(0.1 * 1e23 ** 0.5, rel=1e-5) and o["D"] == pytest.approx(1e23 / (6 * o["N"]), rel=1e-5)
    # from a parametric law, the IsoFLOP minima follow its closed-form optimum
    rows = []
    for cc in (1e19, 1e20, 1e21, 1e22):
        n_star = CHINCHILLA.optimal(cc)["N"]
        for nn in n_star * np.geomspace(0.3, 3.3, 9):
            rows.append((nn, cc / (6 * nn), cc, float(CHINCHILLA.predict(nn, cc / (6 * nn)))))
    n, d, c, loss = map(np.array, zip(*rows))
    fit = fit_isoflop(n, d, c, loss)
    assert fit.n_exponent == pytest.approx(CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta), abs=0.02)
    assert fit.optimal(1e23)["N"] == pytest.approx(CHINCHILLA.optimal(1e23)["N"], rel=0.1)
    with pytest.raises(ValueError, match="at least 5 runs"):
        from app.scaling.chinchilla import fit_parametric

        fit_parametric(n[:4], d[:4], loss[:4])


def test_fit_cli_reads_a_csv_of_size_flops_and_loss(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from app.cli import main

    rng = np.random.default_rng(3)
    rows = []
    for c in (1e18, 1e19, 1e20):
        for n in CHINCHILLA.optimal(c)["N"] * np.geomspace(0.25, 4, 6):
            rows.append((n, c, float(CHINCHILLA.predict(n, c / (6 * n))) * math.exp(rng.normal(0, 0.003))))
    n, c, loss = map(list, zip(*rows))
    path = tmp_path / "runs.csv"
    pcsv.write_csv(pa.table({"Model Size": n, "Training FLOP": c, "Final Loss": loss}), path)
    assert main(["scaling", "fit", str(path), "--target", "1e22", "--out", str(tmp_path / "fit"),
                 "--bootstrap", "10", "--workers", "2", "--top-inits", "100"]) == 0
    out = capsys.readouterr().out
    assert "approach3" in out and "approach2" in out and "C = 1e+22" in out
    rep = json.load(open(tmp_path / "fit" / "scaling.json"))
    assert rep["runs"] == 18 and rep["approach3"]["bootstrap_samples"] == 10
    o = rep["approach3"]["optimal"][0]
    assert o["intervals"]["N"][0] <= o["N"] <= o["intervals"]["N"][1]
    for name in ("isoflop.png", "optimal.png", "parametric.png", "report.html"):
        assert os.path.getsize(tmp_path / "fit" / name) > 1000
    assert "data:image/png;base64," in open(tmp_path / "fit" / "report.html").read()
    bad = tmp_path / "bad.csv"
    pcsv.write_csv(pa.table({"size": [1.0], "whatever": [2.0]}), bad)
    assert main(["scaling", "fit", str(bad)]) == 2
    assert "needs model size, loss and tokens or FLOPs" in capsys.readouterr().err


def test_scaling_sweep_on_ray_tune_writes_the_runs_table_and_fits(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.config import load_config
    from app.scaling.sweep import ScalingSweepConfig, sweep
    from tests.test_tune import _texts
    from tests.tiny_models import tiny_llama

    teacher = tiny_llama(str(tmp_path / "teacher"))
    os.makedirs(tmp_path / "kept")
    texts = _texts(240)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), tmp_path / "kept" / "p.parquet")
    sets = [f"output={tmp_path / 'sweep'}", f"distill.teacher={teacher}", f"distill.data.input={tmp_path / 'kept'}",
            "distill.data.seq_len=32", "distill.data.eval_fraction=0.1", "distill.student.arch=mamba2",
            "distill.student.head_dim=8",
            "distill.student.state_size=8", "distill.student.chunk_size=16", "distill.train.num_workers=1",
            "distill.train.batch_size=4", "distill.train.eval_batches=4", "distill.train.lr=0.01",
            "distill.train.checkpoint_every=1000",
            "sizes=[{hidden_size: 8, num_layers: 1}, {hidden_size: 16, num_layers: 1}, {hidden_size: 32, num_layers: 2}]",
            "budgets=[2.5e+7, 5.0e+7, 1.0e+8]", "min_steps=2", "bootstrap=5", "fit_top_inits=100", "max_concurrent_trials=2"]
    cfg = load_config(ScalingSweepConfig, None, sets)
    res = sweep(cfg)
    table = pq.read_table(tmp_path / "sweep" / "runs.parquet").to_pylist()
    assert len(table) == res["runs"] and not res["failed"]
    assert {r["budget"] for r in table} == {2.5e7, 5e7, 1e8}
    per_step = 4 * 32
    for r in table:
        assert r["D"] == r["steps"] * per_step and r["loss"] > 0
        assert r["FLOPs"] == pytest.approx(r["budget"], rel=0.5 / r["steps"] + 1e-9)  # rounded to whole steps
        assert r["N"] > r["N_non_embedding"] > 0
    assert len({r["N"] for r in table}) == 3
    rep = json.load(open(tmp_path / "sweep" / "scaling.json"))
    assert "fit" in rep["approach3"] and len(rep["approach2"]["fit"]["profiles"]) == 3
    assert os.path.isfile(tmp_path / "sweep" / "report.html")
