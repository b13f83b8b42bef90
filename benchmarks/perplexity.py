"""Tokens/s of the perplexity step vs a naive one-document-per-forward loop, same model, same documents.

    python benchmarks/perplexity.py [--model smollm2] [--docs 48] [--max-tokens 256] [--batch-tokens 8192]

The naive loop is what Data-Juicer's perplexity filter does: tokenize one document, one forward with
labels, HF's loss. The step tokenizes separately, packs length-sorted segments into micro-batches and
computes logits only at scored positions. Both are timed on the same documents in one run, and their
per-document NLLs are compared. Target on CPU: >= 5x.

It also prints a ceiling: the tokens/s the model would reach if everything but its linear layers were
free and those ran at this machine's own fp32 GEMM rate, measured here on the model's layer shapes. No
batching scheme can beat it, so ceiling / naive bounds any speed-up over the naive loop.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def gemm_ceiling(model, tokens: int = 2048, seconds: float = 1.0) -> float:
    """Tokens/s if only the model's nn.Linear layers cost time, at the measured GEMM rate for each shape."""
    import time
    from collections import Counter

    import torch

    shapes = Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_batch = 0.0
    for (i, o), n in shapes.items():
        x, w = torch.randn(tokens, i), torch.randn(o, i)
        x @ w.T
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x @ w.T
            reps += 1
        per_batch += n * (time.perf_counter() - t0) / reps
    return tokens / per_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    args = ap.parse_args()
    import torch

    from app.refine.perplexity import PerplexityScorer, Tokenize, naive_perplexity
    from app.refine.sample import collect_texts

    texts = [t for _, t in collect_texts()][: args.docs]
    tok = Tokenize(args.model, args.max_tokens, "first")
    scorer = PerplexityScorer(args.model, max_tokens=args.max_tokens, batch_tokens=args.batch_tokens)
    table = pa.table({"text": texts})
    scorer(tok(table.slice(0, 2)))  # warm-up
    t0 = time.perf_counter()
    out = scorer(tok(table)).to_pylist()
    t_fast = time.perf_counter() - t0
    tokens = sum(r["ppl_tokens"] for r in out)
    t0 = time.perf_counter()
    ref = naive_perplexity(scorer.lm, texts, args.max_tokens)
    t_naive = time.perf_counter() - t0
    ceiling = gemm_ceiling(scorer.lm.model) if scorer.device == "cpu" else float("nan")
    diff = max(abs(r["ppl_nll"] - n) for r, n in zip(out, ref))
    print(f"{args.docs} documents, {tokens} tokens scored, model {args.model}, device {scorer.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  step (tokenize + packed batches) {tokens / t_fast:8.0f} tokens/s  {t_fast:6.1f}s")
    print(f"  naive one doc per forward        {tokens / t_naive:8.0f} tokens/s  {t_naive:6.1f}s")
    print(f"  ceiling: linear layers alone at this machine's fp32 GEMM rate {ceiling:8.0f} tokens/s "
          f"= {ceiling * t_naive / tokens:.2f}x the naive loop")
    print(f"  speed-up {t_naive / t_fast:.2f}x; max |NLL difference| {diff:.2e}; "
          f"mean NLL {np.mean([r['ppl_nll'] for r in out]):.3f}")


if __name__ == "__main__":
    main()
