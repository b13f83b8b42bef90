"""Signatures/s of the batch MinHash path vs datasketch, side by side, on real documents, one core each.

    python benchmarks/minhash.py [--docs 400] [--repeat 3]

Both sides produce identical signatures (checked here). datasketch is timed two ways: `update_batch`
alone on pre-built shingle bytes (its best case), and end to end from the raw text (what a pipeline
pays). Target: >= 20x per core.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from datasketch import MinHash  # noqa: E402

from app.refine.minhash import hashfunc, minhash_signatures, shingles  # noqa: E402
from app.refine.sample import collect_texts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--num-perm", type=int, default=128)
    args = ap.parse_args()
    texts = [t for _, t in collect_texts()][: args.docs]
    n_words = sum(len(t.split()) for t in texts)
    minhash_signatures(texts[:2], num_perm=args.num_perm)  # JIT warm-up (cached on disk afterwards)

    def fast():
        return minhash_signatures(texts, num_perm=args.num_perm)

    pre = [[s.encode() for s in shingles(t)] for t in texts]

    def ds_update_batch():
        out = []
        for sh in pre:
            m = MinHash(num_perm=args.num_perm, hashfunc=hashfunc)
            m.update_batch(sh)
            out.append(m.hashvalues)
        return np.array(out, dtype=np.uint64)

    def ds_end_to_end():
        out = []
        for t in texts:
            m = MinHash(num_perm=args.num_perm, hashfunc=hashfunc)
            m.update_batch([s.encode() for s in shingles(t)])
            out.append(m.hashvalues)
        return np.array(out, dtype=np.uint64)

    best = {}
    results = {}
    for _ in range(args.repeat):  # interleaved, so machine noise hits every side alike
        for name, fn in (("batch (ours)", fast), ("datasketch update_batch", ds_update_batch),
                         ("datasketch from text", ds_end_to_end)):
            t0 = time.perf_counter()
            results[name] = fn()
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
    assert all((r == results["batch (ours)"]).all() for r in results.values()), "signatures differ"
    print(f"{len(texts)} real documents, {n_words} words, num_perm={args.num_perm}, best of {args.repeat}, one core")
    base = len(texts) / best["batch (ours)"]
    for name, s in best.items():
        rate = len(texts) / s
        print(f"  {name:26s} {rate:10.0f} signatures/s   {s * 1e3:8.1f} ms   ours is {base / rate:5.1f}x")


if __name__ == "__main__":
    main()
