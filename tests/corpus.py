"""A test corpus with planted duplicates and every kind of bad input, built from real text on the machine."""

from __future__ import annotations

import itertools
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

from app.refine.components import pairs_in_components
from app.refine.minhash import jaccard, shingles

BAD_LINES = [
    (b'{"text": "truncated json', "bad_json"),
    (b'{"text": "caf\xe9 au lait"}', "invalid_utf8"),
    (b'{"body": "no text field here"}', "missing_text"),
    (b'{"text": 12345}', "text_not_string"),
    (b'["a", "list"]', "not_an_object"),
]


def edit(text: str, rate: float, rnd: random.Random) -> str:
    """Replace a fraction ``rate`` of the words with fresh tokens."""
    w = text.split()
    for i in rnd.sample(range(len(w)), max(1, int(len(w) * rate))):
        w[i] = f"zq{rnd.randrange(10**6)}"
    return " ".join(w)


def build(root: str, real_texts: list[str], n_base: int = 40, seed: int = 0) -> dict:
    """Write shards under ``root``; return the expected facts (good docs by id, bad records, exact groups)."""
    rnd = random.Random(seed)
    base = [" ".join(t.split()[:220]) for t in real_texts if len(t.split()) >= 220][:n_base]
    assert len(base) == n_base, "need more real text on the machine"
    docs: dict[str, str] = {}
    for i, t in enumerate(base):
        docs[f"base-{i:03d}"] = t
    # planted near duplicates at known edit rates (2% and 5% stay above 0.8 Jaccard; 25% falls below)
    for i in range(0, 24):
        rate = [0.01, 0.02, 0.05, 0.25][i % 4]
        docs[f"near-{i:03d}"] = edit(base[i], rate, rnd)
    # a chain: each link is similar (~0.87), the ends are not (~0.76): 3 words replaced per link
    sh = [shingles(t) for t in base]
    lone = next(i for i in range(24, n_base) if i != 35
                and max(jaccard(sh[i], sh[j]) for j in range(n_base) if j != i) < 0.5)
    del docs[f"base-{lone:03d}"]
    w = base[lone].split()
    a = " ".join(w)
    # m replacements per link, each on a plain word and >= 6 words apart, kill 5m of S shingles:
    # J(link) = (S - 5m)/(S + 5m) ~ 0.85, J(ends) = (S - 10m)/(S + 10m) ~ 0.71
    m = -(-len(shingles(a)) // 60)
    plain = [i for i in range(5, len(w) - 5) if w[i].isalpha()]
    spots = []
    for i in plain:
        if not spots or i - spots[-1] >= 6:
            spots.append(i)
    assert len(spots) >= 2 * m
    for i in spots[:m]:
        w[i] = f"chainword{i}"
    b = " ".join(w)
    for i in spots[-m:]:
        w[i] = f"chainword{i}"
    c = " ".join(w)
    docs["chain-1"], docs["chain-2"], docs["chain-3"] = a, b, c
    # exact duplicates (whitespace differs only); the smallest id sits in the last shard
    docs["aa-exact-copy"] = "  " + base[35].replace(" ", "\n ", 3) + "\n"
    docs["zz-exact-copy"] = base[35]
    exact_groups = [sorted(["aa-exact-copy", "zz-exact-copy", "base-035"])]
    # an exact copy of a near duplicate: its exact group's representative (near-000) is itself dropped, and the
    # family's kept document is base-000
    docs["near-000-copy"] = docs["near-000"].replace(" ", "  ", 5)

    ids = sorted(i for i in docs if i != "aa-exact-copy")
    rnd.shuffle(ids)
    shards = [ids[i::3] for i in range(3)]
    shards[2].append("aa-exact-copy")  # the smallest id of its exact group comes last
    os.makedirs(root, exist_ok=True)
    # shard 0: JSONL with bad lines mixed in; shard 1: Parquet (one null text); shard 2: JSONL + an oversized line
    with open(os.path.join(root, "s0.jsonl"), "wb") as f:
        for i, id_ in enumerate(shards[0]):
            f.write(json.dumps({"id": id_, "text": docs[id_], "url": f"u{i}"}).encode() + b"\n")
            if i < len(BAD_LINES):
                f.write(BAD_LINES[i][0] + b"\n")
    pq.write_table(pa.table({"id": shards[1] + ["pq-null"], "text": [docs[i] for i in shards[1]] + [None]}),
                   os.path.join(root, "s1.parquet"))
    big = " ".join(real_texts[0].split() * 50)
    with open(os.path.join(root, "s2.jsonl"), "wb") as f:
        for id_ in shards[2]:
            f.write(json.dumps({"id": id_, "text": docs[id_]}).encode() + b"\n")
        f.write(json.dumps({"id": "too-big", "text": big}).encode() + b"\n")
    with open(os.path.join(root, "s3.txt"), "wb") as f:
        f.write(b"\xff\xfe a text file that is not utf-8")
    n_bad = len(BAD_LINES) + 1 + 1 + 1  # bad lines, parquet null, oversized, bad text file
    return {"docs": docs, "n_bad": n_bad, "exact_groups": exact_groups, "max_doc_bytes": len(big.encode()) - 100,
            "copy_of_near": ("near-000-copy", "near-000", "base-000")}


def true_pairs(docs: dict[str, str], threshold: float, ngram: int = 5) -> set[tuple[str, str]]:
    """All pairs in the same connected component of the exact-Jaccard >= threshold graph (brute force)."""
    sh = {i: shingles(t, ngram) for i, t in docs.items()}
    edges = [(a, b) for a, b in itertools.combinations(sorted(docs), 2) if jaccard(sh[a], sh[b]) >= threshold]
    return pairs_in_components(edges, docs)


def predicted_pairs(dup_rows: list[dict]) -> set[tuple[str, str]]:
    """Pairs in the same component when every duplicates/ row links its doc to its representative."""
    return pairs_in_components([(r["id"], r["representative_id"]) for r in dup_rows])


def planted_pairs(vocab_texts: list[str], n_pairs: int, *, words: int = 1000, lo: float = 0.80, hi: float = 0.85,
                  ngram: int = 5, seed: int = 0) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """Pairs of documents at word-``ngram`` shingle Jaccard in ``[lo, hi]``, unrelated to every other document.

    Each base is ``words`` words drawn at random from the words of ``vocab_texts`` (real text, so real word
    frequencies; random order, so two bases share almost no 5-gram). Its partner replaces ``m`` words, >= ``ngram``
    + 1 apart and away from the ends, with fresh tokens: each replacement kills ``ngram`` shingles of S on both
    sides, J = (S - ngram*m) / (S + ngram*m), with m chosen for a target J drawn uniformly from [lo, hi].
    Returns (docs by id, {(base id, partner id): exact Jaccard}) - the Jaccard is computed, not assumed.
    """
    rnd = random.Random(seed)
    pool = [w for t in vocab_texts for w in t.split() if w.isalpha()]
    docs: dict[str, str] = {}
    pairs: dict[tuple[str, str], float] = {}
    S = words - ngram + 1
    spacing = ngram + 1
    slots = list(range(ngram, words - ngram, spacing))  # candidate positions, every ngram+1 words
    for p in range(n_pairs):
        base = [rnd.choice(pool) for _ in range(words)]
        target = rnd.uniform(lo, hi)
        m = round(S * (1 - target) / (ngram * (1 + target)))
        for m in sorted({m, m - 1, m + 1}, key=lambda x: abs(x - S * (1 - target) / (ngram * (1 + target)))):
            if lo <= (S - ngram * m) / (S + ngram * m) <= hi:
                break
        edited = list(base)
        for i in rnd.sample(slots, m):
            edited[i] = f"zq{p}x{i}"
        a, b = f"pair{p:05d}-a", f"pair{p:05d}-b"
        docs[a], docs[b] = " ".join(base), " ".join(edited)
        j = jaccard(shingles(docs[a], ngram), shingles(docs[b], ngram))
        assert lo <= j <= hi, (p, m, j)  # repeated 5-grams in a base could move it; none expected
        pairs[(a, b)] = j
    return docs, pairs
