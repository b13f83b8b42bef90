import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from app.models import ModelLoadError, load_causal_lm
from app.refine.perplexity import PerplexityScorer, Tokenize, list_arrays, naive_perplexity, pack, segments
from tests.tiny_models import WORDS, tiny_granite, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"))


def _docs(n, seed=0, lo=1, hi=120):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi))) for _ in range(n)]


def test_segments_score_every_token_once():
    ids = list(range(1000))
    for window, max_tokens, context in (("sliding", 128, 32), ("sliding", 100, 0), ("first", 128, 32)):
        segs = segments(ids, max_tokens, window, context)
        assert all(len(s) <= max_tokens for s, _ in segs)
        scored = [t for s, first in segs for t in s[first:]]
        assert scored == (ids[1:] if window == "sliding" else ids[1:max_tokens])
    assert segments([5], 10, "first", 2) == []


def test_pack_keeps_every_index_and_bounds_padding():
    rnd = random.Random(1)
    lengths = [rnd.randint(1, 300) for _ in range(200)]
    batches = pack(lengths, 1024)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 1024 or len(b) == 1


def test_list_arrays_equals_to_pylist_on_sliced_chunked_columns_with_nulls():
    rows = [[1, 2, 3], None, [], [4], [5, 6], None, [7, 8, 9, 10]]
    col = pa.chunked_array([pa.array(rows[:4], pa.list_(pa.int32())), pa.array(rows[4:], pa.list_(pa.int32()))])
    for view in (col, col.slice(1), col.slice(2, 4), col.slice(5)):
        got = [None if a is None else a.tolist() for a in list_arrays(view)]
        assert got == view.to_pylist()


def test_scorer_matches_the_naive_reference(tiny_dir):
    docs = _docs(12)
    tok = Tokenize(tiny_dir, max_tokens=64, window="first")
    sc = PerplexityScorer(tiny_dir, max_tokens=64, batch_tokens=256)
    out = sc(tok(pa.table({"text": docs}))).to_pylist()
    ref = naive_perplexity(load_causal_lm(tiny_dir), docs, max_tokens=64)
    for row, r, d in zip(out, ref, docs):
        assert row["ppl_nll"] == pytest.approx(r, abs=1e-4)
        assert row["ppl_tokens"] == min(len(d.split()), 63)
        assert row["perplexity"] == pytest.approx(np.exp(r), rel=1e-4)


def test_results_do_not_depend_on_batch_size_and_order_is_restored(tiny_dir):
    docs = _docs(40, seed=2) + [None, ""]
    tok = Tokenize(tiny_dir, max_tokens=96, window="first")
    table = tok(pa.table({"text": pa.array(docs, pa.string())}))
    small = PerplexityScorer(tiny_dir, max_tokens=96, batch_tokens=96)(table).to_pylist()
    big = PerplexityScorer(tiny_dir, max_tokens=96, batch_tokens=8192)(table).to_pylist()
    one_by_one = [PerplexityScorer(tiny_dir, max_tokens=96)(tok(pa.table({"text": [d]}))).to_pylist()[0]
                  for d in docs[:5]]
    assert len(small) == len(big) == len(docs)
    for a, b in zip(small, big):
        assert a["ppl_tokens"] == b["ppl_tokens"]
        assert (a["ppl_nll"] is None and b["ppl_nll"] is None) or a["ppl_nll"] == pytest.approx(b["ppl_nll"], abs=1e-4)
    for a, b in zip(small[:5], one_by_one):
        assert a["ppl_nll"] == pytest.approx(b["ppl_nll"], abs=1e-4)
    assert small[-2]["ppl_nll"] is None and small[-1]["ppl_tokens"] == 0


def test_sliding_window_scores_the_whole_document(tiny_dir):
    long_doc = _docs(1, seed=3, lo=400, hi=400)[0]
    first = PerplexityScorer(tiny_dir, max_tokens=64, window="first")
    slide = PerplexityScorer(tiny_dir, max_tokens=64, window="sliding", context=16)
    r1 = first(Tokenize(tiny_dir, 64, "first")(pa.table({"text": [long_doc]}))).to_pylist()[0]
    r2 = slide(Tokenize(tiny_dir, 64, "sliding")(pa.table({"text": [long_doc]}))).to_pylist()[0]
    assert r1["ppl_tokens"] == 63 and r2["ppl_tokens"] == 400


def test_model_errors_name_the_reference(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        load_causal_lm(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="not-an-org/not-a-model.*tried"):
        load_causal_lm("not-an-org/not-a-model")


def test_gpu_benchmark_script_runs_in_smoke_mode_and_accounts_for_every_token(ray_local, tiny_dir, tmp_path):
    """benchmarks/gpu_scoring.py is run on a GPU only when one is lent: keep it working on CPU (joined to the
    session's Ray, as under ``ray job submit``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_scoring.py"), "--smoke",
                           "--model", tiny_dir, "--out", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_scoring.json").read_text())
    assert report["pipeline_tokens"] == report["expected_tokens"] > 0
    assert report["best_batch"] >= 1 and report["bare_best_tokens_per_s"] > 0
    assert -1 <= report["spearman_bf16_fp32"] <= 1 and report["parity_docs"] > 0


def test_scores_go_through_the_models_own_head_path(tmp_path):
    """A model whose forward does more after lm_head than a matrix product (Granite: / logits_scaling) is scored
    as its own forward scores it."""
    path = tiny_granite(str(tmp_path / "granite"))
    docs = _docs(6, seed=3)
    sc = PerplexityScorer(path, max_tokens=64, batch_tokens=256)
    out = sc(Tokenize(path, max_tokens=64, window="first")(pa.table({"text": docs}))).to_pylist()
    ref = naive_perplexity(load_causal_lm(path), docs, max_tokens=64)
    assert [r["ppl_nll"] for r in out] == pytest.approx(ref, abs=1e-4)


def test_bfloat16_scoring_on_cpu_matches_the_reference_in_bfloat16(tiny_dir):
    """The dtype CUDA scoring takes (bf16), forced on CPU: the scorer runs, and agrees with the model's own loss
    in bf16 to bf16's precision."""
    import torch

    docs = _docs(8, seed=5)
    sc = PerplexityScorer(tiny_dir, max_tokens=64, batch_tokens=256, dtype="bfloat16")
    assert sc.lm.model.dtype == torch.bfloat16
    out = sc(Tokenize(tiny_dir, max_tokens=64, window="first")(pa.table({"text": docs}))).to_pylist()
    ref = naive_perplexity(load_causal_lm(tiny_dir, dtype=torch.bfloat16), docs, max_tokens=64)
    ref32 = naive_perplexity(load_causal_lm(tiny_dir), docs, max_tokens=64)
    assert all(np.isfinite(r["ppl_nll"]) for r in out)
    assert [r["ppl_nll"] for r in out] == pytest.approx(ref, abs=0.05)
    assert [r["ppl_nll"] for r in out] == pytest.approx(ref32, abs=0.05)
