"""The refine job with its model steps: tiny Llama for perplexity, tiny Detoxify checkpoint for toxicity."""

import json
import os
import random

import pyarrow.parquet as pq
import pytest

from app.config import RefineConfig, load_config
from app.refine.decide import NLL_EDGES, percentile_of, quantile, summarize
from app.refine.toxicity import ToxicityUnavailable
from tests.tiny_models import WORDS, tiny_detoxify, tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ckpt, hf = tiny_detoxify(str(root / "detox"))
    return {"llama": tiny_llama(str(root / "llama")), "ckpt": ckpt, "hf": hf}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rnd = random.Random(5)
    root = tmp_path_factory.mktemp("scored")
    for shard in range(2):
        with open(root / f"s{shard}.jsonl", "w") as f:
            for i in range(15):
                n = rnd.randint(3, 80) if i % 5 else 2  # every fifth document is too short for gopher_min_words
                f.write(json.dumps({"id": f"s{shard}-{i:02d}", "text": " ".join(rnd.choice(WORDS) for _ in range(n))}) + "\n")
        with open(root / f"s{shard}.jsonl", "a") as f:
            f.write("{broken\n")
    return str(root)


def _cfg(models, *extra):
    return load_config(RefineConfig, None, [
        f"perplexity.model={models['llama']}", "perplexity.max_tokens=64", "perplexity.batch_size=7",
        f"toxicity.checkpoint={models['ckpt']}", f"toxicity.hf_config_path={models['hf']}",
        "heuristics.min_words=10", "heuristics.c4_min_sentences=null", "heuristics.min_stop_words=null",
        "heuristics.max_dup_5gram_char_frac=null", "heuristics.max_dup_6gram_char_frac=null",
        "heuristics.max_dup_7gram_char_frac=null", "heuristics.max_dup_8gram_char_frac=null",
        "heuristics.max_dup_9gram_char_frac=null", "heuristics.max_dup_10gram_char_frac=null",
        "heuristics.max_top_2gram_char_frac=null", "heuristics.max_top_3gram_char_frac=null",
        "heuristics.max_top_4gram_char_frac=null", "dedup.num_partitions=2", *extra])


def _rows(out, sub):
    p = os.path.join(out, sub)
    return pq.read_table(p).to_pylist() if os.path.isdir(p) else []


def test_model_steps_score_survivors_and_decide(ray_local, models, corpus, tmp_path):
    from app.refine.pipeline import run_refine

    out = str(tmp_path / "out")
    cfg = _cfg(models, "decide.max_nll_percentile=0.8", "decide.max_toxicity=0.99")
    rep = run_refine([corpus], out, cfg, keep_work=True)
    c = rep["counts"]
    assert c["input"] == 32 and c["quarantined"] == 2 and c["input"] == c["kept"] + c["dropped"] + c["quarantined"]
    rows = _rows(out, "kept") + _rows(out, "dropped")
    assert len(rows) == 30
    pre_model = {"gopher_min_words"}
    for r in rows:
        survived = not (set(r.get("drop_reasons") or []) & pre_model)
        assert (r["ppl_nll"] is not None) == survived  # only survivors of dedup + heuristics are scored
        assert (r["toxicity"] is not None) == survived
        if survived:
            assert r["quality_bucket"] in {"head", "middle", "tail"} and r["quality_score"] is not None
            assert r["toxicity"] == pytest.approx(max(r[f"tox_{k}"] for k in
                                                  ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")))
    high = [r for r in rows if "high_perplexity" in (r.get("drop_reasons") or [])]
    assert high and all(r["nll_percentile"] > 0.8 for r in high)
    assert rep["toxicity"]["available"] and rep["perplexity"]["available"]
    for s in rep["shards"]:
        assert s["scored"] > 0 and s["perplexity_p10"] <= s["perplexity_p50"] <= s["perplexity_p90"]
        assert s["toxicity_p90"] is not None
    assert any(st["name"] == "score" for st in rep["steps"])

    # A crash while the final write was under way: the scores are not computed again, and the decision,
    # made from the per-source statistics kept in the scoring unit's record, is the same.
    for f in ("output.json", "complete.json"):
        os.remove(os.path.join(out, "_work", "done", f))
    os.remove(os.path.join(out, "report.json"))
    with open(os.path.join(out, "kept", "part-000099.parquet"), "w") as f:
        f.write("a file a killed writer left")
    rep_resumed = run_refine([corpus], out, cfg)
    assert rep_resumed["resume"]["units_run"] == ["output"]
    assert set(rep_resumed["resume"]["units_skipped"]) == {"ingest-g00000", "graph", "score-g00000"}
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(_rows(out, "kept") + _rows(out, "dropped"), key=key) == sorted(rows, key=key)
    assert rep_resumed["counts"] == rep["counts"] and rep_resumed["shards"] == rep["shards"]

    out2 = str(tmp_path / "out2")
    rep2 = run_refine([corpus], out2, _cfg(models, "scoring.score_dropped=true", "dedup.near.enabled=false"))
    assert all(r["ppl_nll"] is not None for r in _rows(out2, "kept") + _rows(out2, "dropped"))
    assert rep2["counts"]["input"] == rep2["counts"]["kept"] + rep2["counts"]["dropped"] + rep2["counts"]["quarantined"]


def test_toxicity_required_fails_before_reading_data(ray_local, models, corpus, tmp_path):
    from app.refine.pipeline import run_refine

    out = tmp_path / "out"
    with pytest.raises(ToxicityUnavailable, match="no Detoxify checkpoint"):
        run_refine([corpus], str(out), _cfg(models, f"toxicity.checkpoint={tmp_path / 'missing.ckpt'}",
                                            "toxicity.required=true"))
    assert not out.exists()
    rep = run_refine([corpus], str(out), _cfg(models, f"toxicity.checkpoint={tmp_path / 'missing.ckpt'}",
                                              "perplexity.enabled=false"))
    assert rep["toxicity"]["available"] is False and "no Detoxify checkpoint" in rep["toxicity"]["reason"]
    assert all("toxicity" not in r for r in _rows(str(out), "kept") + _rows(str(out), "dropped"))


def test_histogram_statistics():
    import numpy as np

    rnd = np.random.default_rng(0)
    vals = rnd.normal(4.0, 0.5, 5000)
    hist = np.histogram(np.clip(vals, 0, 20), bins=NLL_EDGES)[0]
    st = {"s": {"n": len(vals), "sum": vals.sum(), "sumsq": (vals ** 2).sum(), "nll_hist": hist.tolist(),
                "tox_n": 0, "tox_sum": 0.0, "tox_hist": [0] * 1000}}
    summ = summarize(st)["s"]
    assert summ["nll_mean"] == pytest.approx(4.0, abs=0.03) and summ["nll_std"] == pytest.approx(0.5, abs=0.03)
    assert quantile(hist, NLL_EDGES, 0.5) == pytest.approx(np.median(vals), abs=0.02)
    assert percentile_of(float(np.quantile(vals, 0.9)), summ["nll_quantiles"]) == pytest.approx(0.9, abs=0.02)
    assert summ["toxicity_p50"] is None
