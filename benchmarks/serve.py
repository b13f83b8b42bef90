"""Serving throughput and latency: dynamic batching vs max_batch_size=1, side by side in one run.

    python benchmarks/serve.py [--model DIR] [--concurrency 1 8 32] [--max-tokens 32] [--batch-wait 0.05]
                               [--replica-cpus 1] [--out out/bench_serve/serve.json]

Two copies of the same application run at once on 127.0.0.1, one replica each: batching on under /on
(``batch.max_batch_size`` = the highest concurrency, ``batch_wait_timeout_s`` = ``--batch-wait``) and off under
/off (``max_batch_size=1``). For each concurrency c, the two are measured one after the other on the same
requests: 4c of them (at least 16), c in flight at a time, sent by the official ``openai`` async client. Prompts
are real text from this machine (package descriptions and licences), 16 to 128 tokens; every request generates
exactly ``--max-tokens`` tokens (``ignore_eos``), greedy. Throughput is generated tokens / wall time; latency
is per request, end to end; "batch" is the mean number of sequences per batch (from /health).
Target: >= 3x throughput at concurrency 32 with batching.

The default model is a small Mamba-2 student built here with SmolLM2's tokenizer and vocabulary (49,152),
hidden 256, 4 layers, random init (speed does not depend on the weights' values). ``--model`` takes any
checkpoint (a distilled student on a GPU: ``--replica-gpus 1``).
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def build_student(path: str, hidden: int, layers: int) -> str:
    from transformers import Mamba2ForCausalLM

    from app.distill.student import StudentShape, student_config
    from app.models import SMOLLM2, load_model_config, load_tokenizer

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch

    torch.manual_seed(0)
    cfg = student_config(load_model_config(SMOLLM2), StudentShape(hidden_size=hidden, num_layers=layers,
                                                                    head_dim=64, state_size=64))
    Mamba2ForCausalLM(cfg).save_pretrained(path)
    load_tokenizer(SMOLLM2).save_pretrained(path)
    return path


def prompts(tokenizer, n: int, seed: int = 0) -> list[str]:
    from app.refine.sample import collect_texts

    rng = random.Random(seed)
    texts = [t for _, t in collect_texts()]
    rng.shuffle(texts)
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= 128:
            out.append(tokenizer.decode(ids[: rng.randint(16, 128)]))
        if len(out) == n:
            return out
    raise SystemExit("not enough text on this machine for the prompts")


def health(base: str) -> dict:
    import requests

    return requests.get(base[: -len("/v1")] + "/health", timeout=30).json()


async def load(base: str, name: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    lat, tokens = [], []

    async def one(p: str) -> None:
        async with gate:
            t0 = time.perf_counter()
            r = await client.completions.create(model=name, prompt=p, max_tokens=max_tokens, temperature=0,
                                                extra_body={"ignore_eos": True})
            lat.append(time.perf_counter() - t0)
            tokens.append(r.usage.completion_tokens)

    before = health(base)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in texts))
    wall = time.perf_counter() - t0
    await client.close()
    after = health(base)
    q = statistics.quantiles(lat, n=20)
    return {"requests": len(texts), "tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": statistics.median(lat), "p95_s": q[18], "batches": after["batches"] - before["batches"],
            "mean_batch": (after["sequences"] - before["sequences"]) / max(after["batches"] - before["batches"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint to serve (default: a small student built here)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-wait", type=float, default=0.05, help="batch.batch_wait_timeout_s with batching on")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--replica-gpus", type=float, default=0.0)
    ap.add_argument("--out", default="out/bench_serve/serve.json")
    args = ap.parse_args()

    import torch
    from ray import serve

    from app.config import load_config
    from app.models import load_causal_lm, load_tokenizer
    from app.raystart import init_ray
    from app.serve.config import ServeConfig
    from app.serve.server import application

    model = args.model or build_student(os.path.join(os.path.dirname(args.out), "student"), args.hidden, args.layers)
    tok = load_tokenizer(model)
    top = max(args.concurrency)
    texts = prompts(tok, 4 * top)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=max(4, os.cpu_count() or 1))  # logical CPUs: both replicas and the proxy fit
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    modes = {"on": top, "off": 1}
    for mode, size in modes.items():
        cfg = load_config(ServeConfig, None, [
            f"model={model}", "model_name=bench", f"deployment.num_cpus={args.replica_cpus}",
            f"deployment.num_gpus={args.replica_gpus}", f"deployment.max_ongoing_requests={max(64, 2 * top)}",
            f"batch.max_batch_size={size}", f"batch.batch_wait_timeout_s={args.batch_wait if size > 1 else 0.0}", f"limits.max_tokens={args.max_tokens}"])
        serve.run(application(cfg), name=f"bench-{mode}", route_prefix=f"/{mode}", blocking=False)
    base = {m: f"http://127.0.0.1:{port}/{m}/v1" for m in modes}
    for m in modes:  # warm-up: first forward, allocator, connections
        asyncio.run(load(base[m], "bench", texts[:4], 4, args.max_tokens))

    rows = []
    for c in args.concurrency:
        batch = texts[: max(4 * c, 16)]
        res = {m: asyncio.run(load(base[m], "bench", batch, c, args.max_tokens)) for m in modes}
        rows.append({"concurrency": c, **{m: res[m] for m in modes},
                     "speedup": res["on"]["tokens_per_s"] / res["off"]["tokens_per_s"]})
    serve.shutdown()

    n_params = sum(p.numel() for p in load_causal_lm(model).model.parameters())
    info = {"model": model, "parameters": n_params, "max_tokens": args.max_tokens, "replica_cpus": args.replica_cpus,
            "replica_gpus": args.replica_gpus, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    print(f"model {model} ({n_params / 1e6:.1f}M parameters), {args.max_tokens} tokens per request, "
          f"replica {args.replica_cpus} CPU / {args.replica_gpus} GPU")
    print(f"{'conc':>4} | {'batching: tok/s':>15} {'p50 s':>7} {'p95 s':>7} {'batch':>5} | {'max_batch_size=1: tok/s':>23} "
          f"{'p50 s':>7} {'p95 s':>7} | speed-up")
    for r in rows:
        on, off = r["on"], r["off"]
        print(f"{r['concurrency']:>4} | {on['tokens_per_s']:>15.1f} {on['p50_s']:>7.2f} {on['p95_s']:>7.2f} "
              f"{on['mean_batch']:>5.1f} | "
              f"{off['tokens_per_s']:>23.1f} {off['p50_s']:>7.2f} {off['p95_s']:>7.2f} | {r['speedup']:.2f}x")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
