"""Pairwise precision / recall / F1 of the near-duplicate clusters against exact-Jaccard ground truth.

    python benchmarks/dedup_quality.py [--threshold 0.8] [--max-docs 0]

The corpus is real text on this machine: the licence files and descriptions of the installed Python
packages and Debian's /usr/share/doc/*/copyright files (many near-identical licences with other
copyright lines). Ground truth: all pairs in one connected component of the graph whose edges are
document pairs with exact shingle Jaccard >= threshold (brute force over every pair that the size bound
|A|/|B| >= threshold allows). Predicted: pairs in one component when every duplicates/ row links its
document to its representative (exact and near clusters together). The pipeline runs with verify on
(the target: precision 1.0, recall >= 0.97) and off, side by side.

    python benchmarks/dedup_quality.py --planted 1000 [--banding 16x8]

``--planted N``: N pairs planted at Jaccard 0.80-0.85 (``tests.corpus.planted_pairs``: 1,000-word documents of
random real words, the partner with m words replaced, m chosen for a target Jaccard), every other pair
unrelated, so the planted pairs are the ground truth. Target: precision 1.0, recall >= 0.99 at threshold 0.8.
``--banding BxR`` runs with that banding instead of the default (``16x8`` is datasketch's weighted optimum,
the banding before recall-first); ``--banding none`` passes no banding keys (for a checkout that has none).
Each line gives the candidate pairs verified and the graph phase's seconds (``report.json`` phases).
"""

import argparse
import glob
import json
import os
import sys
import tempfile
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.refine.components import pairs_in_components  # noqa: E402
from app.refine.minhash import shingles  # noqa: E402
from app.refine.sample import collect_texts  # noqa: E402


def corpus(max_docs: int) -> dict[str, str]:
    docs = {f"py-{i:05d}": t for i, (_, t) in enumerate(collect_texts())}
    for i, path in enumerate(sorted(glob.glob("/usr/share/doc/*/copyright"))):
        try:
            with open(path, encoding="utf-8") as f:
                t = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if len(t) >= 200:
            docs[f"deb-{i:05d}"] = t
    if max_docs:
        docs = dict(list(docs.items())[:max_docs])
    return docs


def truth(docs: dict[str, str], threshold: float) -> set:
    sh = {k: shingles(v) for k, v in docs.items()}
    keys = sorted(sh, key=lambda k: len(sh[k]))
    edges = []
    for i, a in enumerate(keys):
        la = len(sh[a])
        for b in keys[i + 1:]:
            lb = len(sh[b])
            if la < threshold * lb:  # J <= |A|/|B| < threshold: no later b can qualify
                break
            inter = len(sh[a] & sh[b])
            if inter / (la + lb - inter) >= threshold:
                edges.append((a, b))
    return pairs_in_components(edges, docs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--max-docs", type=int, default=0)
    ap.add_argument("--planted", type=int, default=0, help="pairs planted at Jaccard 0.80-0.85 instead of real text")
    ap.add_argument("--banding", default="", help="BxR to force a banding; 'none': no banding keys (old checkouts)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (graph seconds: best of them)")
    args = ap.parse_args()
    import pyarrow.parquet as pq
    import ray

    from app.config import RefineConfig, load_config
    from app.refine.pipeline import run_refine

    if args.planted:
        from tests.corpus import planted_pairs

        docs, pairs = planted_pairs([t for _, t in collect_texts()], args.planted, seed=3)
        gt = set(pairs)
        print(f"corpus: {len(docs)} documents, {len(gt)} pairs planted at Jaccard "
              f"{min(pairs.values()):.3f}-{max(pairs.values()):.3f}, every other pair unrelated")
    else:
        docs = corpus(args.max_docs)
        t0 = time.time()
        gt = truth(docs, args.threshold)
        print(f"corpus: {len(docs)} real documents; ground truth: {len(gt)} duplicate pairs ({time.time() - t0:.1f}s brute force)")
    banding = []
    if args.banding and args.banding != "none":
        b, r = args.banding.split("x")
        banding = [f"dedup.near.bands={int(b)}", f"dedup.near.rows={int(r)}"]
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "corpus.jsonl"), "w") as f:
            for k, v in docs.items():
                f.write(json.dumps({"id": k, "text": v}) + "\n")
        for verify in ((True,) if args.planted else (True, False)):
            cfg = load_config(RefineConfig, None, ["heuristics.enabled=false", "perplexity.enabled=false", "toxicity.enabled=false", f"dedup.near.threshold={args.threshold}",
                                                   f"dedup.near.verify={str(verify).lower()}", *banding])
            out = os.path.join(tmp, f"out-{verify}")
            graph_secs = []
            for _ in range(args.repeat):
                t0 = time.time()
                rep = run_refine([os.path.join(tmp, "corpus.jsonl")], out, cfg, overwrite=True)
                secs = time.time() - t0
                graph_secs.append(rep["phases_seconds"].get("dedup_graph", float("nan")))
            rows = pq.read_table(os.path.join(out, "duplicates")).to_pylist()
            pred = pairs_in_components([(r["id"], r["representative_id"]) for r in rows], docs)
            tp = len(gt & pred)
            p = tp / len(pred) if pred else 1.0
            r = tp / len(gt) if gt else 1.0
            f1 = 2 * p * r / (p + r) if p + r else 0.0
            d = rep["dedup"]
            print(f"  threshold {args.threshold} verify={str(verify):5s}  precision {p:.4f}  recall {r:.4f}  F1 {f1:.4f}  "
                  f"(pred pairs {len(pred)}, exact dups {d['exact_duplicates']}, near dups {d['near_duplicates']}, "
                  f"bands {d['bands']}x{d['rows']}, {secs:.0f}s)")
            print(f"    candidates verified {d.get('candidate_edges', 'n/a')}, verified edges {d['verified_edges']}, "
                  f"cc rounds {d['cc_rounds']}, graph phase {min(graph_secs):.2f}s (best of {len(graph_secs)}: "
                  f"{', '.join(f'{x:.2f}' for x in graph_secs)})")


if __name__ == "__main__":
    main()
