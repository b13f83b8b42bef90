import random
import sys

import numpy as np
import pyarrow as pa
import pytest

from app.refine.toxicity import ToxicityScorer, ToxicityUnavailable, load_detoxify
from tests.tiny_models import WORDS, tiny_detoxify


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_detoxify(str(tmp_path_factory.mktemp("detox")))


def _text(n, seed):
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS + ["idiot", "stupid", "hate"]) for _ in range(n))


def test_short_texts_equal_detoxify_itself(ckpt):
    from detoxify import Detoxify

    path, hf = ckpt
    texts = [_text(n, s) for s, n in enumerate([3, 10, 20, 25])]
    ours = ToxicityScorer(checkpoint=path, hf_config_path=hf)
    got = ours(pa.table({"text": texts})).to_pylist()
    ref = Detoxify(checkpoint=path, huggingface_config_path=hf).predict(texts)
    assert ours.classes == list(ref)  # Detoxify's standardised names: toxicity, severe_toxicity, ...
    for i, row in enumerate(got):
        for name in ours.classes:
            assert row[f"tox_{name}"] == pytest.approx(ref[name][i], abs=1e-5)
        assert row["toxicity"] == pytest.approx(max(ref[name][i] for name in ours.classes), abs=1e-5)


def test_long_documents_are_scored_in_chunks_max_over_chunks(ckpt):
    import torch

    path, hf = ckpt
    sc = ToxicityScorer(checkpoint=path, hf_config_path=hf, batch_size=3)
    long_doc = _text(200, 7)
    chunks = sc.chunks(long_doc)
    ids = sc.tok(long_doc, add_special_tokens=False)["input_ids"]
    assert len(chunks) > 1 and all(len(c) <= 32 for c in chunks)
    assert [t for c in chunks for t in c[1:-1]] == ids  # every token in exactly one chunk
    with torch.inference_mode():
        per_chunk = [torch.sigmoid(sc.model(input_ids=torch.tensor([c])).logits)[0].numpy() for c in chunks]
    texts = [_text(5, 1), long_doc, None, ""]
    got = sc.score(texts)
    np.testing.assert_allclose(got[1], np.max(per_chunk, axis=0), atol=1e-5)
    assert np.isnan(got[2]).all() and not np.isnan(got[3]).any()
    np.testing.assert_allclose(got[0], sc.score([texts[0]])[0], atol=1e-5)  # batching/order do not matter


def test_missing_or_bad_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(ToxicityUnavailable, match="no Detoxify checkpoint at") as e:
        load_detoxify("original", str(tmp_path / "missing.ckpt"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ToxicityUnavailable, match="cannot load"):
        load_detoxify("original", str(bad))
    with pytest.raises(ToxicityUnavailable, match="unknown variant"):
        load_detoxify("spicy", None)


# ------------------------------------------------------------------------------ the offline backend

# Written for these tests: plain insults and profanity, and everyday sentences (some with words a word list
# would trip on: killer, hell-free, ...). The offline model must put every offensive one above its default
# threshold and every clean one far below it.
OFFENSIVE = ["You are a fucking idiot and everyone here hates you.",
             "Shut up, you stupid bitch.",
             "What a worthless piece of shit this guy is.",
             "Go to hell, you disgusting moron.",
             "Fuck off and never come back, asshole.",
             "This retard has no idea what he is talking about, what a dumbass.",
             "I hope you choke on it, you pathetic loser.",
             "Nobody wants your crap here, get lost you jerk."]
CLEAN = ["The committee met on Tuesday to review the annual budget.",
         "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
         "The library is open every day except on public holidays.",
         "Thank you for the detailed review of my pull request.",
         "Rainfall in the region was well above average this spring.",
         "Install the package with pip and run the test suite before sending a patch.",
         "The killer whale is the largest member of the dolphin family.",
         "Her thesis examines trade routes between Venice and Constantinople."]


@pytest.fixture(scope="module")
def offline():
    from app.refine.toxicity import ProfanityCheckScorer

    return ProfanityCheckScorer()


def test_word_chunks_hold_every_word_once_cut_at_sentences():
    from app.refine.toxicity import word_chunks

    rnd = random.Random(3)
    for seed in range(30):
        sentences = [_text(rnd.randint(1, 70), seed * 100 + i) + rnd.choice([".", "!", "?", "", "\n"])
                     for i in range(rnd.randint(0, 12))]
        text = " ".join(sentences)
        for n in (1, 5, 32):
            chunks = word_chunks(text, n)
            assert [w for c in chunks for w in c.split()] == text.split()  # every word, once, in order
            assert all(len(c.split()) <= n for c in chunks)
    # sentences (and lines) packed greedily, kept whole when they fit
    assert word_chunks("One two three. Four five six seven! Eight\nnine ten", 5) == \
        ["One two three.", "Four five six seven! Eight", "nine ten"]
    assert word_chunks("", 8) == [""] and word_chunks("a b c d e f g", 3) == ["a b c", "d e f", "g"]


def test_offline_scores_equal_its_package_per_chunk_max_over_chunks(offline):
    """The scorer is alt-profanity-check's own predict_prob (the reference) on each chunk, max over chunks."""
    import profanity_check

    short = OFFENSIVE[:3] + CLEAN[:3] + [""]
    got = offline(pa.table({"text": short + [None]})).to_pylist()
    ref = profanity_check.predict_prob(short)
    for row, want in zip(got, ref):
        assert row["tox_offensive"] == pytest.approx(want, abs=1e-12) and row["toxicity"] == row["tox_offensive"]
    assert got[-1]["toxicity"] is None and got[-1]["tox_offensive"] is None  # not scored
    long_doc = " ".join(CLEAN * 3) + " " + OFFENSIVE[1] + " " + " ".join(CLEAN * 2)
    chunks = offline.chunks(long_doc)
    assert len(chunks) > 5
    assert offline.score([long_doc])[0, 0] == pytest.approx(profanity_check.predict_prob(chunks).max(), abs=1e-12)


def test_offline_separates_offensive_from_clean_sentences(offline):
    from app.config import DecideConfig

    threshold = DecideConfig().toxicity_threshold("profanity_check")
    off = offline.score(OFFENSIVE)[:, 0]
    clean = offline.score(CLEAN)[:, 0]
    assert off.min() > threshold and clean.max() < 0.2, (off, clean)
    # One insult in ~350 clean words: in its own chunk it is seen; the whole document as one bag of words is not.
    doc = " ".join(CLEAN * 2) + " " + OFFENSIVE[1] + " " + " ".join(CLEAN * 2)
    import profanity_check

    assert offline.score([doc])[0, 0] > threshold > profanity_check.predict_prob([doc])[0]


# ------------------------------------------------------------------------------ which backend scores


def _no_offline(monkeypatch):
    """As on a machine without alt-profanity-check (or Python 3.10, where it cannot be installed)."""
    monkeypatch.setitem(sys.modules, "profanity_check", None)
    monkeypatch.setitem(sys.modules, "profanity_check.profanity_check", None)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache (Detoxify's release files are looked up there)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_auto_takes_detoxify_when_its_checkpoint_loads_else_the_offline_model(ckpt, hub, monkeypatch):
    import shutil

    from app.refine.toxicity import VARIANTS, select_backend

    path, hf = ckpt
    off = select_backend("auto")  # nothing in the hub cache, no checkpoint named
    assert (off.backend, off.labels, off.reason) == ("profanity_check", ["offensive"], "ok")
    assert off.model.startswith("alt-profanity-check ") and "no Detoxify checkpoint at" in off.selection
    hub.mkdir(parents=True)
    shutil.copy(path, hub / VARIANTS["original"])  # the release file where Detoxify would have downloaded it
    det = select_backend("auto", hf_config_path=hf)
    assert det.backend == "detoxify" and det.model == str(hub / VARIANTS["original"])
    assert det.labels == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    assert select_backend("auto", checkpoint=path, hf_config_path=hf).backend == "detoxify"
    assert select_backend("profanity_check", checkpoint=path).backend == "profanity_check"  # named: no auto


def test_a_backend_that_cannot_load_is_one_clear_line(hub, tmp_path, monkeypatch):
    from app.refine.toxicity import ToxicityUnavailable, select_backend

    with pytest.raises(ToxicityUnavailable, match="no Detoxify checkpoint at"):
        select_backend("detoxify")  # named: no fallback
    # a checkpoint named in the config means Detoxify was asked for: auto does not fall back
    with pytest.raises(ToxicityUnavailable, match="no Detoxify checkpoint at"):
        select_backend("auto", checkpoint=str(tmp_path / "missing.ckpt"))
    _no_offline(monkeypatch)
    with pytest.raises(ToxicityUnavailable, match="needs the PyPI package alt-profanity-check") as e:
        select_backend("profanity_check")
    assert "\n" not in str(e.value)
    with pytest.raises(ToxicityUnavailable) as e:
        select_backend("auto")
    assert "no Detoxify checkpoint at" in str(e.value) and "alt-profanity-check" in str(e.value)
    assert "\n" not in str(e.value)


def _refine_cfg(*extra):
    from app.config import RefineConfig, load_config

    return load_config(RefineConfig, None, ["perplexity.enabled=false", "heuristics.enabled=false",
                                            "dedup.exact.enabled=false", "dedup.near.enabled=false",
                                            "dedup.num_partitions=2", *extra])


@pytest.fixture
def small_corpus(tmp_path):
    from tests.conftest import write_jsonl

    docs = [{"id": f"o{i}", "text": t} for i, t in enumerate(OFFENSIVE[:3])]
    docs += [{"id": f"c{i}", "text": t} for i, t in enumerate(CLEAN)]
    return write_jsonl(str(tmp_path / "in" / "a.jsonl"), docs)


@pytest.mark.parametrize("backend", ["profanity_check", "auto"])
def test_required_backend_missing_fails_before_reading_data(ray_local, hub, small_corpus, tmp_path, monkeypatch,
                                                            backend):
    from app.refine.pipeline import run_refine
    from app.refine.toxicity import ToxicityUnavailable

    _no_offline(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ToxicityUnavailable, match="alt-profanity-check"):
        run_refine([small_corpus], str(out), _refine_cfg(f"toxicity.backend={backend}", "toxicity.required=true"))
    assert not out.exists()
    rep = run_refine([small_corpus], str(out), _refine_cfg(f"toxicity.backend={backend}"))  # not required: skipped
    assert rep["toxicity"]["available"] is False and "alt-profanity-check" in rep["toxicity"]["reason"]
    assert rep["thresholds"]["max_toxicity"] is None and rep["counts"]["kept"] == 11


def test_offline_backend_in_the_job_and_a_resume_with_another_backend_is_refused(ray_local, hub, ckpt, small_corpus,
                                                                                  tmp_path):
    import json
    import os

    import pyarrow.parquet as pq
    import yaml

    from app.refine.pipeline import run_refine

    out = str(tmp_path / "out")
    rep = run_refine([small_corpus], out, _refine_cfg(), keep_work=True)  # auto, no Detoxify checkpoint anywhere
    tox = rep["toxicity"]
    assert tox["available"] and tox["backend"] == "profanity_check" and tox["labels"] == ["offensive"]
    assert "no Detoxify checkpoint" in tox["selection"]
    assert rep["thresholds"]["max_toxicity"] == 0.7 and rep["thresholds"]["toxicity_backend"] == "profanity_check"
    rows = [r for sub in ("kept", "dropped") for r in pq.read_table(os.path.join(out, sub)).to_pylist()]
    assert all(r["toxicity"] == r["tox_offensive"] is not None for r in rows)
    assert {r["id"] for r in rows if r.get("drop_reason") == "toxic"} == {"o0", "o1", "o2"}
    assert rep["drop_reasons"] == {"toxic": 3} and sum(rep["histograms"]["toxicity"]["kept"]) == len(CLEAN)
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["toxicity"]["backend"] == "profanity_check"  # resolved: the backend that scored
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["toxicity"]["model"].startswith("alt-profanity-check")

    # cut off before the final write; the same settings with Detoxify now loadable: another run, refused
    for f in ("output.json", "complete.json"):
        os.remove(os.path.join(out, "_work", "done", f))
    os.remove(os.path.join(out, "report.json"))
    path, hf = ckpt
    with pytest.raises(FileExistsError, match="toxicity.backend: 'profanity_check' -> 'detoxify'"):
        run_refine([small_corpus], out, _refine_cfg(f"toxicity.checkpoint={path}", f"toxicity.hf_config_path={hf}"))
    again = run_refine([small_corpus], out, _refine_cfg())  # auto resolves as before: resumed
    assert again["resume"]["units_run"] == ["output"] and again["counts"] == rep["counts"]
