"""GPU perplexity scoring: the step inside a Ray Data pipeline vs the bare model forward, and bf16 vs fp32.

    python benchmarks/gpu_scoring.py [--model smollm2|PATH] [--docs 4000] [--max-tokens 1024] [--out DIR]
    python benchmarks/gpu_scoring.py --smoke --model TINY_DIR --out DIR     # CPU, seconds (the test suite runs it)

Three measurements, one run, one JSON report (``DIR/gpu_scoring.json``) and a printed summary:

1. bare forward: the model's decoder + LM head + token cross-entropy on full ``(B, max_tokens)`` batches of
   real tokens already on the device (no tokenization, no padding, no data movement), bf16, for B in
   1, 2, 4, ... until memory or time runs out; tokens/s at the best B.
2. pipeline: the same documents through Ray Data exactly as ``distillery refine`` wires them
   (``app.refine.scoring.add_model_steps``: CPU tokenizer actors, one GPU scoring actor, length-packed
   micro-batches of the best B x max_tokens tokens), end to end from an in-memory dataset to materialized
   rows; tokens/s with and without the actor's model load. Target: >= 70% of the bare forward.
3. parity: per-document perplexity of the same documents with the model in bf16 and in fp32; Spearman rho
   (target >= 0.99) and the NLL differences.

On the H200 lent by the device tool, Ray, gguf and the SmolLM2 GGUF are not installed and together exceed
what one call may carry (64 MiB): ``benchmarks/device_bundle.py`` packs them into parts that travel one call
each and says how to run this script there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def documents(n: int) -> list[str]:
    """n real texts from this machine (license and metadata files of installed packages), cycled if short."""
    from app.refine.sample import collect_texts

    texts = [t for _, t in collect_texts()]
    if not texts:
        raise SystemExit("no text found on this machine to score")
    return [texts[i % len(texts)] for i in range(n)]


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(lm, ids: np.ndarray, device: str, max_batch: int, seconds: float) -> dict[int, float]:
    """Tokens/s of decoder + head + cross-entropy on (B, T) real-token batches, per batch size B."""
    import torch

    model, out = lm.model, {}
    head = model.get_output_embeddings()
    B = 1
    while B <= min(max_batch, len(ids)):
        x = torch.from_numpy(ids[:B].astype(np.int64)).to(device)
        try:
            with torch.inference_mode():
                def step():
                    h = model.get_decoder()(input_ids=x).last_hidden_state[:, :-1]
                    logits = head(h).float()
                    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum")
                step()
                sync(device)
                reps, t0 = 0, time.perf_counter()
                while reps < 3 or time.perf_counter() - t0 < seconds:
                    step()
                    reps += 1
                sync(device)
                dt = (time.perf_counter() - t0) / reps
        except torch.OutOfMemoryError:
            break
        out[B] = B * (x.shape[1] - 1) / dt
        print(f"  bare forward B={B:4d}: {out[B]:12.0f} tokens/s", flush=True)
        if len(out) >= 3 and out[B] < 1.02 * max(v for k, v in out.items() if k < B):
            break  # no longer growing
        B *= 2
    return out


def pipeline(model_ref: str, texts: list[str], max_tokens: int, batch_tokens: int, num_gpus: float, extra: list,
             blocks: int) -> tuple[int, float]:
    """(tokens scored, seconds) for the documents through the refine job's model steps in Ray Data."""
    import ray

    from app.config import RefineConfig, load_config
    from app.refine.scoring import SCORE_COLUMN, add_model_steps

    cfg = load_config(RefineConfig, overrides=[
        f"perplexity.model={model_ref}", f"perplexity.max_tokens={max_tokens}",
        f"perplexity.batch_tokens={batch_tokens}", f"perplexity.num_gpus={num_gpus}", "toxicity.enabled=false", *extra])
    table = pa.table({"text": texts, SCORE_COLUMN: texts})
    step = -(-len(texts) // blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(texts), step)])
    ds = add_model_steps(ds, cfg, toxicity_ok=False)
    t0 = time.perf_counter()
    tokens = int(sum(b["ppl_tokens"].sum() for b in ds.iter_batches(batch_format="numpy", batch_size=None)))
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--parity-docs", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per bare-forward batch size")
    ap.add_argument("--blocks", type=int, default=64, help="Ray Data blocks of the input")
    ap.add_argument("--out", default="out/gpu_scoring")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for the pipeline")
    ap.add_argument("--smoke", action="store_true", help="CPU, few documents: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        args.docs, args.parity_docs, args.max_tokens, args.max_batch, args.seconds, args.blocks = 24, 12, 32, 4, 0.05, 4
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch

    from app.models import load_causal_lm
    from app.raystart import init_ray
    from app.refine.perplexity import PerplexityScorer, Tokenize

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: this benchmark measures a GPU (use --smoke to check it on CPU)")
    report: dict = {"model": args.model, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "torch": torch.__version__, "docs": args.docs, "max_tokens": args.max_tokens,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    texts = documents(args.docs)
    tok = Tokenize(args.model, args.max_tokens, "first")
    ids = tok.ids(texts)
    full = np.array([d for d in ids if len(d) == args.max_tokens], dtype=np.int32)
    if len(full) == 0:
        raise SystemExit(f"no document reaches {args.max_tokens} tokens")
    report["docs_at_max_tokens"] = len(full)
    report["expected_tokens"] = sum(max(len(d) - 1, 0) for d in ids)  # every document's tokens but its first

    print("1. bare forward (bf16)", flush=True)
    t0 = time.perf_counter()
    lm = load_causal_lm(args.model, device=device, dtype=torch.bfloat16)
    report["model_load_s"] = time.perf_counter() - t0
    sweep = bare_forward(lm, full, device, args.max_batch, args.seconds)
    best_b = max(sweep, key=sweep.get)
    report["bare_forward_tokens_per_s"] = {str(k): v for k, v in sweep.items()}
    report["best_batch"], report["bare_best_tokens_per_s"] = best_b, sweep[best_b]
    del lm
    if device == "cuda":
        torch.cuda.empty_cache()

    print("2. Ray Data pipeline", flush=True)
    init_ray()
    tokens, secs = pipeline(args.model, texts, args.max_tokens, best_b * args.max_tokens,
                            1.0 if device == "cuda" else 0.0, args.set, args.blocks)
    report["pipeline_tokens"], report["pipeline_s"] = tokens, secs
    report["pipeline_tokens_per_s"] = tokens / secs
    report["pipeline_tokens_per_s_without_model_load"] = tokens / max(secs - report["model_load_s"], 1e-9)
    report["pipeline_vs_bare"] = report["pipeline_tokens_per_s"] / sweep[best_b]
    report["pipeline_vs_bare_without_model_load"] = report["pipeline_tokens_per_s_without_model_load"] / sweep[best_b]

    print("3. bf16 vs fp32", flush=True)
    sub = ids[: args.parity_docs]
    ppl = {}
    for dtype in ("bfloat16", "float32"):
        sc = PerplexityScorer(args.model, max_tokens=args.max_tokens, batch_tokens=best_b * args.max_tokens,
                              device=device, dtype=dtype)
        s, c = sc.score_ids(sub)
        ppl[dtype] = s / np.maximum(c, 1)
        del sc
        if device == "cuda":
            torch.cuda.empty_cache()
    scored = c > 0
    diff = np.abs(ppl["bfloat16"][scored] - ppl["float32"][scored])
    report["parity_docs"] = int(scored.sum())
    report["spearman_bf16_fp32"] = spearman(ppl["bfloat16"][scored], ppl["float32"][scored])
    report["nll_abs_diff_max"], report["nll_abs_diff_median"] = float(diff.max()), float(np.median(diff))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_scoring.json"), "w") as f:
        json.dump(report, f, indent=1)
    ok = lambda v, t: "met" if v >= t else "NOT met"  # noqa: E731
    print(f"device {report['device']}, torch {report['torch']}, {tokens} tokens")
    print(f"bare forward best B={best_b}: {sweep[best_b]:.0f} tokens/s")
    print(f"pipeline: {report['pipeline_tokens_per_s']:.0f} tokens/s = {report['pipeline_vs_bare']:.1%} of bare "
          f"({report['pipeline_vs_bare_without_model_load']:.1%} without the model load); target 70%: "
          f"{ok(report['pipeline_vs_bare'], 0.7)}")
    rho = report["spearman_bf16_fp32"]
    print(f"bf16 vs fp32 over {report['parity_docs']} documents: Spearman {rho:.4f} (target 0.99: "
          f"{ok(rho if not math.isnan(rho) else -1, 0.99)}), |NLL diff| median {report['nll_abs_diff_median']:.2e} "
          f"max {report['nll_abs_diff_max']:.2e}")


if __name__ == "__main__":
    main()
