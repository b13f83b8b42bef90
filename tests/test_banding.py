"""Recall-first LSH banding: the chooser's guarantee and optimality, and recall on pairs planted at 0.80-0.85."""

import os

import numpy as np
import pytest

from app.config import ConfigError, NearDedupConfig, RefineConfig, load_config
from app.refine.banding import _false_candidates, choose_banding, collision_probability
from app.refine.minhash import band_hashes, minhash_signatures
from tests.corpus import planted_pairs

THRESHOLDS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


@pytest.mark.parametrize("num_perm", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("min_recall", [0.95, 0.99, 0.999])
def test_chooser_meets_min_recall_with_the_fewest_candidates(num_perm, min_recall):
    for t in THRESHOLDS:
        got = choose_banding(t, num_perm, min_recall)
        assert got.bands * got.rows <= num_perm
        assert got.recall_at_threshold >= min_recall
        assert got.recall_at_threshold == pytest.approx(1 - (1 - t ** got.rows) ** got.bands)
        # Brute force over every banding that fits: none reaching min_recall has fewer expected candidates.
        for r in range(1, num_perm + 1):
            for b in range(1, num_perm // r + 1):
                if collision_probability(t, b, r) >= min_recall:
                    assert _false_candidates(t, b, r) >= got.false_candidates - 1e-12, (t, b, r, got)


def test_default_banding_and_overrides():
    got = choose_banding(0.8, 128, 0.99)
    assert (got.bands, got.rows, got.chosen_by) == (16, 6, "min_recall")
    # datasketch's weighted optimum (16 x 8, the banding before) finds a pair at exactly 0.8 one time in ~19 less often
    from datasketch import MinHashLSH

    ds = MinHashLSH(threshold=0.8, num_perm=128, weights=(0.05, 0.95))
    assert (ds.b, ds.r) == (16, 8)
    old = choose_banding(0.8, 128, 0.99, bands=16, rows=8)
    assert old.chosen_by == "config" and old.recall_at_threshold == pytest.approx(0.9470, abs=1e-4)
    assert got.false_candidates > old.false_candidates  # the price: more candidates to verify
    only_rows = choose_banding(0.8, 128, 0.99, rows=5)  # the fewest bands of 5 rows that reach 0.99
    assert only_rows.rows == 5 and only_rows.recall_at_threshold >= 0.99
    assert collision_probability(0.8, only_rows.bands - 1, 5) < 0.99
    assert choose_banding(0.8, 128, 0.99, bands=8).bands == 8
    with pytest.raises(ValueError, match="min_recall"):
        choose_banding(0.5, 4, 0.99)  # 4 permutations cannot: 4 bands of 1 row find a pair at 0.5 with 0.9375
    # a band of many rows collides with a denormal probability at a low threshold: skipped, not an overflow
    assert choose_banding(0.3, 1024, 0.99).recall_at_threshold >= 0.99
    assert choose_banding(0.05, 256, 0.99).recall_at_threshold >= 0.99
    assert choose_banding(0.5, 2048, 0.99).recall_at_threshold >= 0.99
    with pytest.raises(ValueError, match="exceeds num_perm"):
        choose_banding(0.8, 128, 0.99, bands=20, rows=8)


def test_config_validates_the_banding():
    assert NearDedupConfig().min_recall == 0.99
    with pytest.raises(ConfigError, match="dedup.near"):
        load_config(RefineConfig, None, ["dedup.near.bands=20", "dedup.near.rows=8"])
    with pytest.raises(ConfigError, match="min_recall"):
        load_config(RefineConfig, None, ["dedup.near.num_perm=4", "dedup.near.threshold=0.5"])
    with pytest.raises(ConfigError, match="min_recall"):
        load_config(RefineConfig, None, ["dedup.near.min_recall=1.0"])
    # an unused near-dedup config is not held to a banding
    load_config(RefineConfig, None, ["dedup.near.enabled=false", "dedup.near.num_perm=4", "dedup.near.threshold=0.5"])


@pytest.fixture(scope="module")
def planted(real_texts):
    return planted_pairs(real_texts, 1000, seed=1)


def _band_recall(docs, pairs, bands, rows):
    ids = sorted(docs)
    pos = {i: k for k, i in enumerate(ids)}
    keys = band_hashes(minhash_signatures([docs[i] for i in ids], num_perm=128), bands, rows)
    return float(np.mean([(keys[pos[a]] == keys[pos[b]]).any() for a, b in pairs]))


def test_planted_pairs_are_found_at_the_threshold(planted):
    docs, pairs = planted
    sims = np.array(list(pairs.values()))
    assert sims.min() >= 0.80 and sims.max() <= 0.85 and (sims < 0.81).sum() >= 150  # many just above 0.8
    new = choose_banding(0.8, 128, 0.99)
    assert _band_recall(docs, pairs, new.bands, new.rows) >= 0.99
    # the corpus is hard enough to tell the two apart: datasketch's 16 x 8 misses more than 1 pair in 100
    assert _band_recall(docs, pairs, 16, 8) < 0.99


def test_pipeline_recall_and_precision_on_planted_pairs(ray_local, real_texts, tmp_path):
    """End to end (buckets, verification, components): every planted pair found is right, >= 99% are found."""
    from app.refine.pipeline import run_refine
    from tests.corpus import predicted_pairs
    from tests.conftest import write_jsonl
    from tests.test_refine import read_dir

    docs, pairs = planted_pairs(real_texts, 200, seed=2)
    path = write_jsonl(str(tmp_path / "planted.jsonl"), [{"id": k, "text": v} for k, v in docs.items()])
    cfg = load_config(RefineConfig, None, ["heuristics.enabled=false", "perplexity.enabled=false",
                                           "toxicity.enabled=false", "dedup.num_partitions=2"])
    out = str(tmp_path / "out")
    rep = run_refine([path], out, cfg)
    pred = predicted_pairs(read_dir(os.path.join(out, "duplicates")))
    truth = set(pairs)  # the bases are unrelated (random 5-grams): the planted pairs are all the true pairs
    assert pred <= truth  # precision 1.0
    assert len(pred & truth) / len(truth) >= 0.99
    d = rep["dedup"]
    assert (d["bands"], d["rows"], d["chosen_by"]) == (16, 6, "min_recall")
    assert d["recall_at_threshold"] == pytest.approx(0.9923, abs=1e-4)
    assert d["candidate_edges"] >= d["verified_edges"] == len(pred)
