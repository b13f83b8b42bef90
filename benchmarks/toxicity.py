"""The offline toxicity backend (``profanity_check``: alt-profanity-check's model) on ``make run``'s corpus,
one core: documents/s, seconds per 1,000 documents, and its score distribution.

    python benchmarks/toxicity.py [--repeat 3] [--batch 64] [--chunk-words 32] [--seed 0]

Documents: the texts ``make run``'s sample corpus is built from (``app.refine.sample.collect_texts``: the
licence files and package descriptions of the installed Python packages), every one, in origin order; the
refine job scores only those that survive dedup and the heuristics, a subset of these. Timing: the Ray
Data callable (``ProfanityCheckScorer.__call__``) on Arrow batches of ``--batch`` documents, as the job
calls it, best of ``--repeat``, pinned to one core with BLAS/OpenMP at one thread; the model load (the
package's import, which unpickles its two joblib files) is timed apart.

What is printed besides the timing, to judge the model and the chunking by, not to certify it:

- quantiles of the document scores on the corpus, and its highest-scoring documents with the chunk that
  scored (read them: licences and READMEs, not abuse);
- the written offensive and clean sentences of ``tests/test_toxicity.py``, and a few hard cases (obfuscated
  profanity, hostility without swear words, identity terms, profanity used without hostility);
- chunking: one offensive sentence of the test put at a random place in a corpus document (150 to 600 of
  its words), 200 such documents; the share scored over the threshold for chunks of 16, 32 and 64 words and
  for the whole document as one bag of words, beside the corpus's own scores at each setting.

These are not quality figures: the corpus has no labels, and the sentences are a handful written for a test.
The model's own published figures are quoted in README.md.
"""

import argparse
import os
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

HARD = [
    ("obfuscated", "f4ck you, you b1tch"),
    ("no swear words", "People like you should not be allowed to vote or to live here."),
    ("negated", "I am not saying you are stupid."),
    ("identity terms", "I am a proud gay black woman."),
    ("identity terms", "My neighbours are Muslim and Jewish families."),
    ("profanity, friendly", "Damn, that was a great game!"),
    ("profanity, quoted", "The WTFPL is a licence that says: do what the fuck you want to."),
]
QS = [0.1, 0.5, 0.9, 0.99, 1.0]


def chunk_scores(scorer, texts, chunk_words):
    """Document scores with ``chunk_words`` words per chunk (None: the whole document, one bag of words)."""
    if chunk_words is None:
        return scorer.model.predict_proba(scorer.vectorizer.transform(texts))[:, scorer.positive]
    scorer.chunk_words = chunk_words
    return scorer.score(texts)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk-words", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    from app.config import DecideConfig
    from app.refine.sample import collect_texts
    from app.refine.toxicity import ProfanityCheckScorer, offline_model_name
    from tests.test_toxicity import CLEAN, OFFENSIVE

    threshold = DecideConfig().toxicity_threshold("profanity_check")
    items = collect_texts()
    origins, texts = [o for o, _ in items], [t for _, t in items]
    n_words = sum(len(t.split()) for t in texts)
    t0 = time.perf_counter()
    scorer = ProfanityCheckScorer(chunk_words=args.chunk_words)
    load_s = time.perf_counter() - t0
    n_chunks = sum(len(scorer.chunks(t)) for t in texts)
    batches = [pa.table({"text": texts[i:i + args.batch]}) for i in range(0, len(texts), args.batch)]
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = [scorer(b) for b in batches]
        best = min(best, time.perf_counter() - t0)
    scores = np.concatenate([b.column("toxicity").to_numpy() for b in out])
    t0 = time.perf_counter()
    chunk_scores(scorer, texts, None)
    whole_s = time.perf_counter() - t0
    scorer.chunk_words = args.chunk_words

    print(f"model: {offline_model_name()} (profanity_check backend), chunk_words={args.chunk_words}, one core, "
          f"batches of {args.batch}, best of {args.repeat}")
    print(f"corpus: make run's sample texts, {len(texts):,} documents, {n_words:,} words, {n_chunks:,} chunks "
          f"(median {int(np.median([len(t.split()) for t in texts]))} words per document)")
    print(f"load (import, unpickle): {load_s:.2f} s")
    print(f"scoring: {best:.3f} s = {len(texts) / best:,.0f} docs/s = {1000 * best / len(texts):.3f} s per 1,000 "
          f"documents ({n_words / best / 1e6:.2f} M words/s); whole documents unchunked: {whole_s:.3f} s")
    print("scores on the corpus: " + "  ".join(f"p{int(q * 100)} {np.quantile(scores, q):.3f}" for q in QS)
          + f"  mean {scores.mean():.3f}")
    over = " / ".join(str(int((scores > t).sum())) for t in (0.5, threshold, 0.9))
    print(f"documents over 0.5 / {threshold:g} (decide.max_toxicity.profanity_check) / 0.9: {over} of {len(texts)}")
    print("highest-scoring documents (the chunk that scored):")
    for i in np.argsort(-scores)[:6]:
        ch = scorer.chunks(texts[i])
        s = scorer.score(ch)[:, 0]
        print(f"  {scores[i]:.3f}  {origins[i]}: {ch[int(np.argmax(s))][:110]!r}")

    print("written sentences (tests/test_toxicity.py):")
    for name, group in (("offensive", OFFENSIVE), ("clean", CLEAN)):
        s = scorer.score(group)[:, 0]
        print(f"  {name:9s} min {s.min():.3f}  median {np.median(s):.3f}  max {s.max():.3f}  ({len(group)} sentences)")
    print("hard cases (not in the test):")
    for kind, text in HARD:
        print(f"  {scorer.score([text])[0, 0]:.3f}  {kind}: {text!r}")

    rnd = np.random.default_rng(args.seed)
    hosts = [t.split() for t in texts if len(t.split()) >= 150]
    planted = []
    for k in range(200):
        host = hosts[rnd.integers(len(hosts))][: int(rnd.integers(150, 601))]
        at = int(rnd.integers(len(host) + 1))
        planted.append(" ".join(host[:at] + OFFENSIVE[k % len(OFFENSIVE)].split() + host[at:]))
    print(f"chunking: one offensive sentence planted in 150-600 words of a corpus document (200 documents); "
          f"share over {threshold:g}, vs the corpus's own documents:")
    for cw in (16, 32, 64, None):
        p = chunk_scores(scorer, planted, cw)
        c = chunk_scores(scorer, texts, cw)
        print(f"  {'whole document' if cw is None else f'{cw} words':15s} planted found {np.mean(p > threshold):.0%}  "
              f"corpus p99 {np.quantile(c, 0.99):.3f}  corpus over {threshold:g}: {int((c > threshold).sum())}")
    scorer.chunk_words = args.chunk_words


if __name__ == "__main__":
    main()
