"""Peak memory per Ray worker when the corpus grows 4x, side by side in one run.

    python benchmarks/dedup_memory.py [--docs 1500] [--partition-mib 1]

Builds a corpus of N and of 4N documents from real text on this machine (windows of licence files and
package descriptions; a fixed 20% are edited copies, so both sizes have the same duplicate density), in
shards of a fixed size, and runs the refine job (heuristics off: this measures the dedup path) on a fresh local
Ray for each. The duplicate graph partitions scale with the input (`dedup.partition_bytes`), which is how
the job keeps memory per worker flat. A sampler thread records every Ray worker process's peak
private memory (RSS minus shared pages, so object-store pages mapped into a worker do not count).
Target: the 4N peak within ~1.25x of the N peak.

    python benchmarks/dedup_memory.py --giant 0.1 [--docs 1500]

``--giant F``: a fraction F of the documents are copies of one text with 1% of their words replaced (each
copy its own words: one near-duplicate cluster of F*N, boilerplate pages at web scale), the others 300 real
words in random order with the same 20% of edited copies (see ``build``). It
prints, per graph task, the peak private memory a worker reached while running it, and the largest share of
the cluster one task held: the most candidate pairs in one verification task and the most edges in one
connected-components task (``report.json``'s ``max_task_pairs``/``max_task_cc_rows``), beside what routing
every pair to its anchor's part would have put in one task (counted on the candidate edges kept in
``_work/edges``: the routing before issue 21). Target: the per-task figures about flat from N to 4N.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from app.refine.sample import collect_texts  # noqa: E402


def build(root: str, n: int, per_shard: int = 250, seed: int = 0, giant: float = 0.0) -> int:
    """n documents: 300 words stitched from three random windows of real texts; 20% of them are copies of an
    earlier document with 1% or 5% of the words replaced, so the duplicate density does not change with n.
    ``giant``: that fraction of the documents are copies of the first one with 1% of the words replaced, and the
    others are 300 real words in random order (windows of a fixed pool of texts overlap more often the more
    documents are drawn, which grows the candidate pairs faster than the corpus and hides what one cluster does)."""
    rnd = random.Random(seed)
    texts = [t.split() for _, t in collect_texts()]
    texts = [t for t in texts if len(t) >= 100]
    pool = [w for t in texts for w in t if w.isalpha()]
    os.makedirs(root, exist_ok=True)
    size = 0
    f = None
    docs: list[list[str]] = []
    for i in range(n):
        if i % per_shard == 0:
            if f:
                f.close()
            f = open(os.path.join(root, f"shard-{i // per_shard:05d}.jsonl"), "w")
        if docs and rnd.random() < giant:  # one cluster of boilerplate copies
            w = list(docs[0])
            for j in rnd.sample(range(len(w)), 3):
                w[j] = f"g{i}x{j}"
        elif docs and rnd.random() < 0.2:
            w = list(rnd.choice(docs))
            for j in rnd.sample(range(len(w)), max(1, int(len(w) * rnd.choice([0.01, 0.05])))):
                w[j] = f"w{rnd.randrange(10**6)}"
        elif giant:  # real words in random order: unrelated documents stay unrelated however many there are
            w = [rnd.choice(pool) for _ in range(300)]
            docs.append(w)
        else:
            w = []
            for _ in range(3):
                t = rnd.choice(texts)
                o = rnd.randrange(len(t) - 99)
                w += t[o:o + 100]
            docs.append(w)
        line = json.dumps({"id": f"doc-{i:08d}", "text": " ".join(w)}) + "\n"
        size += len(line)
        f.write(line)
    f.close()
    return size


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak: dict[int, int] = {}
        self.task_peak: dict[str, int] = {}  # the most private memory of a worker while it ran this task
        self.what: dict[int, str] = {}  # the last task a worker ran when it reached its peak
        self.last: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stop.is_set():
            for p in me.children(recursive=True):  # this run's Ray (its raylet's workers), not another session's
                try:
                    cmd = " ".join(p.cmdline() or [])
                    if "default_worker.py" not in cmd and not cmd.startswith("ray::"):
                        continue
                    m = p.memory_info()
                    private = m.rss - getattr(m, "shared", 0)
                    if not cmd.startswith("ray::IDLE"):
                        self.last[p.pid] = cmd.split()[0][:48]
                        if cmd.startswith("ray::"):
                            name = cmd.split()[0][5:48]
                            self.task_peak[name] = max(self.task_peak.get(name, 0), m.rss - getattr(m, "shared", 0))
                    if private > self.peak.get(p.pid, 0):
                        self.peak[p.pid] = private
                        self.what[p.pid] = self.last.get(p.pid, "?")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.1)


GRAPH_TASKS = ("_split_edges", "_serve_texts", "_similarities", "_attach_first", "_attach_second", "_by_larger",
               "_star_min", "_large_star", "_small_star", "_both_directions", "_smaller_direction", "_roots",
               "_root_pairs", "_families", "_finalize")


def anchor_routing(out: str, k: int) -> tuple[int, int]:
    """The most near-candidate rows one part receives when every pair goes to its anchor's part (part(a)), as the
    verification did before issue 21 (its first task held them all before deduplicating); and the distinct
    candidate pairs."""
    import collections

    import pyarrow.parquet as pq

    from app.refine.lsh import partition_of

    t = pq.read_table(os.path.join(out, "_work", "edges"), columns=["a", "b", "kind"]).to_pydict()
    near = [(a, b) for a, b, kind in zip(t["a"], t["b"], t["kind"]) if kind == "near"]
    most = max(collections.Counter(partition_of([a for a, _ in near], k).tolist()).values(), default=0)
    return most, len(set(near))


def measure(inp: str, out: str, partition_mib: int, block_mib: int) -> dict:
    import ray

    from app.config import RefineConfig, load_config
    from app.refine.pipeline import run_refine

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Blocks are capped at 128 MiB by default, so a real corpus (>> 128 MiB) is many blocks; a corpus of a
    # few MiB would be a single block. Scaling the cap down with the corpus keeps this run in that regime.
    ctx.target_max_block_size = block_mib << 20
    s = Sampler()
    s.start()
    t0 = time.time()
    cfg = load_config(RefineConfig, None, ["heuristics.enabled=false", "perplexity.enabled=false", "toxicity.enabled=false", f"dedup.partition_bytes={partition_mib << 20}"])
    rep = run_refine([inp], out, cfg, keep_work=True)
    secs = time.time() - t0
    s.stop.set()
    s.join()
    ray.shutdown()
    peaks = sorted(s.peak.values())
    top = sorted(s.peak, key=s.peak.get)[-3:]
    print("  workers with the largest peaks (last task run):", [(s.what.get(p), s.peak[p] >> 20) for p in top])
    graph = {t: v >> 20 for t, v in sorted(s.task_peak.items()) if t in GRAPH_TASKS}
    print("  graph tasks, peak private memory of a worker while it ran them (MiB):", graph)
    d = rep["dedup"]
    k = rep["config"]["dedup"]["num_partitions"]
    most, candidates = anchor_routing(out, k)
    return {"docs": rep["counts"]["input"], "secs": secs, "workers": len(peaks), "max": peaks[-1] / 2**20,
            "graph_peak": max(graph.values(), default=0), "graph": graph,
            "max_task_pairs": d.get("max_task_pairs"), "max_task_cc_rows": d.get("max_task_cc_rows"),
            "anchor_routing": most, "candidates": candidates, "clusters": d["near_clusters"],
            "skew": (d.get("max_task_pairs") or 0) * k / max(1, candidates),
            "median": statistics.median(peaks) / 2**20, "dups": rep["dedup"]["exact_duplicates"] + rep["dedup"]["near_duplicates"],
            "partitions": rep["config"]["dedup"]["num_partitions"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--partition-mib", type=int, default=1)
    ap.add_argument("--block-mib", type=int, default=1)
    ap.add_argument("--giant", type=float, default=0.0, help="fraction of the corpus in one near-duplicate cluster")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mult in (1, 4):
            inp = os.path.join(tmp, f"in-{mult}")
            size = build(inp, args.docs * mult, giant=args.giant)
            r = measure(inp, os.path.join(tmp, f"out-{mult}"), args.partition_mib, args.block_mib)
            r["mib"] = size / 2**20
            rows.append(r)
    for mult, r in zip((1, 4), rows):
        print(f"  {mult}N: {r['docs']:6d} docs ({r['mib']:5.1f} MiB), {r['dups']} duplicates dropped, {r['secs']:5.0f}s; "
              f"worker peak private memory: max {r['max']:6.0f} MiB, median {r['median']:6.0f} MiB over {r['workers']} workers")
    print(f"  ratio 4N/N: max {rows[1]['max'] / rows[0]['max']:.2f}x, median {rows[1]['median'] / rows[0]['median']:.2f}x "
          f"(corpus {rows[1]['mib'] / rows[0]['mib']:.1f}x)")
    for mult, r in zip((1, 4), rows):
        print(f"  {mult}N graph: {r['partitions']} partitions, {r['clusters']} near clusters, {r['candidates']} candidate "
              f"pairs; most in one task: {r['max_task_pairs']} pairs verified, {r['max_task_cc_rows']} CC edges "
              f"(routed to the anchor's part: {r['anchor_routing']} rows); graph-task peak {r['graph_peak']} MiB; "
              f"most pairs in one task / an even share: {r['skew']:.2f} (anchor routing: "
              f"{r['anchor_routing'] * r['partitions'] / max(1, r['candidates'] or 1):.2f})")
    ratio = lambda key: (f"{rows[1][key] / rows[0][key]:.2f}x" if isinstance(rows[0][key], (int, float)) and rows[0][key]  # noqa: E731
                         else "n/a")
    print(f"  ratio 4N/N graph: pairs in one task {ratio('max_task_pairs')}, CC edges in one task "
          f"{ratio('max_task_cc_rows')}, anchor routing {ratio('anchor_routing')}, graph-task peak {ratio('graph_peak')}")


if __name__ == "__main__":
    main()
