"""Refine throughput per CPU core (dedup + heuristics, no model steps), for sizing a cluster.

    python benchmarks/refine_throughput.py [--docs 16000] [--cpus 2] [--units 8]

Builds corpora of N/4 and N documents of real text (benchmarks/dedup_memory.py's builder: 300-word documents,
20% edited copies) and runs the refine job on each, on a fresh local Ray with --cpus CPUs, perplexity and toxicity
off. A run has a fixed cost (Ray Data start-up, the shuffles' fixed overhead) and a cost per byte; the marginal
rate between the two sizes, (bytes(N) - bytes(N/4)) / (t(N) - t(N/4)), is the rate that sets the cost of a
large corpus. It is printed per core, with the CPU-hours per TB of JSONL it implies (cluster/README.md).

With ``--units U`` the N-document corpus runs a second time cut into U resumable pass-1 units
(``io.checkpoint_bytes`` = its size / U, so U scoring-free units and one graph unit, as a resumable run of that
many units has): the difference is what resumability costs, per unit.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dedup_memory import build  # noqa: E402


def run(inp: str, out: str, cpus: int, sets: tuple = ()) -> tuple[float, dict]:
    import ray

    from app.config import RefineConfig, load_config
    from app.refine.pipeline import run_refine

    ray.init(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.time()
    rep = run_refine([inp], out, load_config(RefineConfig, None, ["perplexity.enabled=false", "toxicity.enabled=false",
                                                                 *sets]))
    secs = time.time() - t0
    ray.shutdown()
    return secs, rep["counts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--units", type=int, default=0, help="also run the larger corpus in this many pass-1 units")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.docs // 4, args.docs):
            size = build(os.path.join(tmp, f"in{n}"), n)
            secs, counts = run(os.path.join(tmp, f"in{n}"), os.path.join(tmp, f"out{n}"), args.cpus)
            rows.append({"docs": n, "bytes": size, "secs": secs, "kept": counts["kept"]})
            print(f"{n:>7} docs  {size / 1e6:7.1f} MB  {secs:6.1f} s  ({n / secs:7.1f} docs/s, kept {counts['kept']})")
        units = None
        if args.units > 1:
            n, size = rows[-1]["docs"], rows[-1]["bytes"]
            secs, counts = run(os.path.join(tmp, f"in{n}"), os.path.join(tmp, f"out{n}-units"), args.cpus,
                               (f"io.checkpoint_bytes={-(-size // args.units)}",))
            assert counts["kept"] == rows[-1]["kept"]
            units = {"units": args.units, "secs": secs, "per_unit_s": (secs - rows[-1]["secs"]) / (args.units - 1)}
            print(f"{n:>7} docs  in {args.units} units: {secs:6.1f} s, {secs / rows[-1]['secs']:.2f}x the one-unit run "
                  f"({units['per_unit_s']:+.1f} s per extra unit)")
    (a, b) = rows
    rate = (b["bytes"] - a["bytes"]) / (b["secs"] - a["secs"]) / args.cpus  # bytes per core-second
    fixed = a["secs"] - a["bytes"] / (rate * args.cpus)
    per_tb = 1e12 / rate / 3600
    print(f"marginal rate: {rate / 1e6:.3f} MB per core-second ({(b['docs'] - a['docs']) / (b['secs'] - a['secs']) / args.cpus:.0f} "
          f"docs per core-second); fixed cost per run about {fixed:.0f} s")
    print(f"=> {per_tb:,.0f} CPU-hours per TB of JSONL (dedup + heuristics)")
    print(json.dumps({"rows": rows, "cpus": args.cpus, "bytes_per_core_s": rate, "cpu_hours_per_tb": per_tb,
                      "units": units}))


if __name__ == "__main__":
    main()
