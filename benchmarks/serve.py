"""Serving throughput and latency: continuous batching vs static batching vs max_batch_size=1, side by side.

    python benchmarks/serve.py [--arch mamba2|hybrid] [--model DIR] [--concurrency 1 8 32] [--max-tokens 32]
                               [--batch-wait 0.05] [--replica-cpus 1] [--out out/bench_serve/serve.json]

Three copies of the same application run at once on 127.0.0.1, one replica each: the continuous scheduler under
/cont (``batch.max_num_seqs`` = the highest concurrency), Ray Serve's static ``@serve.batch`` under /static
(``max_batch_size`` = the highest concurrency, ``batch_wait_timeout_s`` = ``--batch-wait``) and no batching under
/off (static, ``max_batch_size=1``). For each concurrency c, the three are measured one after the other on the
same requests: 4c of them (at least 16), c in flight at a time, sent by the official ``openai`` async client,
twice: whole answers (throughput, latency), then streamed (``stream: true``: time to first token, and the
streamed throughput). Prompts are real text from this machine (package descriptions and licences), 16 to 128
tokens; every request generates exactly ``--max-tokens`` tokens (``ignore_eos``), greedy (``--mixed``: each its
own count, from a quarter to 7/4 of ``--max-tokens``, the same draw for every mode). Throughput is
generated tokens / wall time; latency is per request, end to end; TTFT is the time to the first streamed text.
"batch" is the mean number of sequences per decode step (continuous) or per batch (static), from /health.

Before Serve starts, the engine alone (``Engine.run``, no HTTP, no Serve, the replica's torch threads) decodes
the first 32 prompts as one batch: the offline batch-32 rate the continuous scheduler is measured against; and
the continuous scheduler runs alone, in this process, on 128 requests 32 at a time (what Serve and HTTP cost).
Targets (issue 20): at concurrency 32, continuous >= 1.5x static and >= 0.8x the offline batch-32 rate; at
concurrency 1, continuous p50 latency within 10% of max_batch_size=1.

The default models are small students with SmolLM2's tokenizer and vocabulary (49,152), hidden 256, 4 layers,
random init (speed does not depend on the weights' values): ``--arch mamba2`` a Mamba-2 student (13.9M, issue
8's), ``--arch hybrid`` a hybrid (BambaForCausalLM) keeping attention in layer 1 of 4. ``--model`` takes any
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


def build_student(path: str, hidden: int, layers: int, arch: str = "mamba2") -> str:
    """A random-init student with SmolLM2's vocabulary: Mamba-2, or a hybrid of a small Llama keeping layer 1's
    attention."""
    from transformers import LlamaForCausalLM, Mamba2ForCausalLM

    from app.distill.student import StudentShape, build_student as build, student_config
    from app.models import SMOLLM2, load_model_config, load_tokenizer

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch

    torch.manual_seed(0)
    base = load_model_config(SMOLLM2)
    if arch == "mamba2":
        model = Mamba2ForCausalLM(student_config(base, StudentShape(hidden_size=hidden, num_layers=layers,
                                                                    head_dim=64, state_size=64)))
    else:
        cfg = base.__class__(**{**base.to_dict(), "hidden_size": hidden, "num_hidden_layers": layers,
                                "num_attention_heads": hidden // 64, "num_key_value_heads": max(hidden // 128, 1),
                                "head_dim": 64, "intermediate_size": 4 * hidden})
        model, _ = build(LlamaForCausalLM(cfg), "hybrid", attention_layers=[1])
    model.save_pretrained(path)
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


async def load(base: str, name: str, texts: list[str], concurrency: int, lengths: list[int], stream: bool) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    lat, ttft, tokens = [], [], []

    async def one(p: str, max_tokens: int) -> None:
        async with gate:
            t0, first, n = time.perf_counter(), None, 0
            kw = dict(model=name, prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
            if not stream:
                n = (await client.completions.create(**kw)).usage.completion_tokens
            else:
                async for c in await client.completions.create(stream=True, stream_options={"include_usage": True},
                                                               **kw):
                    if first is None and c.choices and c.choices[0].text:
                        first = time.perf_counter() - t0
                    if c.usage is not None:
                        n = c.usage.completion_tokens
            lat.append(time.perf_counter() - t0)
            ttft.append(first if first is not None else lat[-1])
            tokens.append(n)

    before = health(base)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, n) for p, n in zip(texts, lengths)))
    wall = time.perf_counter() - t0
    await client.close()
    after = health(base)
    q = statistics.quantiles(lat, n=20)
    steps = after["batches"] - before["batches"]
    return {"prefills": after.get("prefills", 0) - before.get("prefills", 0), "requests": len(texts),
            "tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": statistics.median(lat), "p95_s": q[18], "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": statistics.quantiles(ttft, n=20)[18], "steps": steps,
            "mean_batch": (after["row_steps"] - before["row_steps"]) / max(steps, 1)}


def offline_rate(model: str, texts: list[str], lengths: list[int], threads: int) -> dict:
    """The engine alone: the first 32 prompts decoded as one batch by ``Engine.run`` (best of 3), in tokens/s."""
    import torch

    from app.serve.generate import Engine, Row, SamplingParams

    torch.set_num_threads(threads)
    eng = Engine.load(model, device="cpu")
    rows = lambda k: [Row(eng.encode(t), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))  # noqa: E731
                      for t, n in zip(texts[:k], lengths)]
    eng.run(rows(4))  # warm-up
    out = {}
    for k in (1, 32):
        best = float("inf")
        for _ in range(3):
            batch = rows(k)
            t0 = time.perf_counter()
            eng.run(batch)
            best = min(best, time.perf_counter() - t0)
        out[f"batch_{k}_tokens_per_s"] = sum(lengths[:k]) / best
    out["scheduler_alone_tokens_per_s"] = scheduler_alone(eng, texts, lengths)
    return out


def scheduler_alone(eng, texts: list[str], lengths: list[int], concurrency: int = 32) -> float:
    """The continuous scheduler without Serve or HTTP: 4 x ``concurrency`` requests, ``concurrency`` at a time,
    submitted from one event loop (a closed loop, as the clients are), in tokens/s."""
    from app.serve.generate import Row, SamplingParams
    from app.serve.scheduler import ContinuousScheduler

    sch = ContinuousScheduler(eng, max_num_seqs=concurrency, max_prefill_tokens=4096, max_waiting=4 * concurrency)
    ids = [eng.encode(t) for t in texts]

    async def go(n: int) -> float:
        gate = asyncio.Semaphore(concurrency)

        async def one(p: list[int], max_tokens: int) -> int:
            async with gate:
                r = Row(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
                await sch.generate([r])
                return r.completion_tokens

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(ids[i % len(ids)], lengths[i % len(ids)]) for i in range(n)))
        return sum(done) / (time.perf_counter() - t0)

    try:
        asyncio.run(go(concurrency))  # warm-up
        return asyncio.run(go(4 * concurrency))
    finally:
        sch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint to serve (default: a small student built here)")
    ap.add_argument("--arch", choices=["mamba2", "hybrid"], default="mamba2", help="the student built here")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mixed", action="store_true", help="each request's max_tokens drawn from max_tokens/4 to "
                    "7/4 max_tokens (mean max_tokens), instead of max_tokens for all")
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

    model = args.model or build_student(os.path.join(os.path.dirname(args.out), f"student_{args.arch}"), args.hidden,
                                        args.layers, args.arch)
    tok = load_tokenizer(model)
    top = max(args.concurrency)
    texts = prompts(tok, max(4 * top, 32))
    rng = random.Random(1)
    lengths = [rng.randint(args.max_tokens // 4, 7 * args.max_tokens // 4) if args.mixed else args.max_tokens
               for _ in texts]
    offline = offline_rate(model, texts, lengths, max(int(args.replica_cpus), 1)) \
        if not args.replica_gpus else {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=max(4, os.cpu_count() or 1))  # logical CPUs: both replicas and the proxy fit
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    modes = {"cont": ["batch.scheduler=continuous", f"batch.max_num_seqs={top}"],
             "static": ["batch.scheduler=static", f"batch.max_batch_size={top}",
                        f"batch.batch_wait_timeout_s={args.batch_wait}"],
             "off": ["batch.scheduler=static", "batch.max_batch_size=1", "batch.batch_wait_timeout_s=0"]}
    for mode, sets in modes.items():
        cfg = load_config(ServeConfig, None, [
            f"model={model}", "model_name=bench", f"deployment.num_cpus={args.replica_cpus}",
            f"deployment.num_gpus={args.replica_gpus}", f"deployment.max_ongoing_requests={max(64, 2 * top)}",
            f"limits.max_tokens={max(lengths)}", *sets])
        serve.run(application(cfg), name=f"bench-{mode}", route_prefix=f"/{mode}", blocking=False)
    base = {m: f"http://127.0.0.1:{port}/{m}/v1" for m in modes}
    for m in modes:  # warm-up: first forward, allocator, connections
        asyncio.run(load(base[m], "bench", texts[:4], 4, lengths, True))

    rows = []
    for c in args.concurrency:
        batch = texts[: max(4 * c, 16)]
        res = {}
        for m in modes:  # throughput and latency without streaming; time to first token from a streamed pass
            res[m] = asyncio.run(load(base[m], "bench", batch, c, lengths, False))
            streamed = asyncio.run(load(base[m], "bench", batch, c, lengths, True))
            res[m].update({"ttft_p50_s": streamed["ttft_p50_s"], "ttft_p95_s": streamed["ttft_p95_s"],
                           "streamed_tokens_per_s": streamed["tokens_per_s"], "streamed_p50_s": streamed["p50_s"]})
        rows.append({"concurrency": c, **{m: res[m] for m in modes},
                     "cont_vs_static": res["cont"]["tokens_per_s"] / res["static"]["tokens_per_s"],
                     "cont_vs_off_p50": res["cont"]["p50_s"] / res["off"]["p50_s"]})
    serve.shutdown()

    n_params = sum(p.numel() for p in load_causal_lm(model).model.parameters())
    info = {"model": model, "arch": None if args.model else args.arch, "parameters": n_params,
            "max_tokens": args.max_tokens, "mixed": args.mixed, "replica_cpus": args.replica_cpus, "replica_gpus": args.replica_gpus,
            "batch_wait": args.batch_wait, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "offline": offline,
            "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    what = f"{min(lengths)}-{max(lengths)} (mean {statistics.fmean(lengths):.1f})" if args.mixed else args.max_tokens
    print(f"model {model} ({n_params / 1e6:.1f}M parameters), {what} tokens per request, "
          f"replica {args.replica_cpus} CPU / {args.replica_gpus} GPU")
    if offline:
        print(f"engine alone (Engine.run): batch 1 {offline['batch_1_tokens_per_s']:.1f} tok/s, "
              f"batch 32 {offline['batch_32_tokens_per_s']:.1f} tok/s; the continuous scheduler alone (no Serve, "
              f"concurrency 32) {offline['scheduler_alone_tokens_per_s']:.1f} tok/s")
    print(f"{'conc':>4} | {'mode':>6} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'batch':>5} | streamed: {'tok/s':>7} "
          f"{'ttft50':>6} {'ttft95':>6}")
    for r in rows:
        for m in modes:
            x = r[m]
            print(f"{r['concurrency']:>4} | {m:>6} {x['tokens_per_s']:>7.1f} {x['p50_s']:>6.2f} {x['p95_s']:>6.2f} "
                  f"{x['mean_batch']:>5.1f} |           {x['streamed_tokens_per_s']:>7.1f} {x['ttft_p50_s']:>6.3f} "
                  f"{x['ttft_p95_s']:>6.3f}")
        line = (f"     continuous / static {r['cont_vs_static']:.2f}x, continuous p50 / max_batch_size=1 p50 "
                f"{r['cont_vs_off_p50']:.2f}")
        if offline and r["concurrency"] >= 32:
            ratio = r["cont"]["tokens_per_s"] / offline["batch_32_tokens_per_s"]
            line += f", continuous / engine batch-32 {ratio:.2f}x"
        print(line)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
