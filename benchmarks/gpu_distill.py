"""Student training throughput on a GPU: the mamba-ssm / causal-conv1d kernels vs transformers' torch path,
and a short distillation run's losses.

    python benchmarks/gpu_distill.py [--teacher smollm2|PATH] [--seq-len 2048] [--batch 8] [--out DIR]
    python benchmarks/gpu_distill.py --smoke --teacher TINY_DIR --out DIR    # CPU, seconds (the test suite runs it)

One run, one JSON report (``DIR/gpu_distill.json``) and a printed summary:
1. throughput: the student (built from the teacher by ``app.distill.student``: the hybrid keeping
   ``--attention`` of the attention layers, 1/4 by default, or ``--arch mamba2``; attention init) in bf16,
   forward + backward of next-token CE on (batch, seq_len) tokens, timed over --steps steps after warm-up,
   twice: with the implementations transformers picked at import (the mamba-ssm kernels when installed) and
   with its torch fallbacks patched in. tokens/s, and MFU = 6 N tokens/s / peak bf16 FLOP/s (N: the
   student's parameters without the embedding; --peak-tflops, 989 for an H100/H200 SXM dense).
2. distillation: --distill-steps steps of stage kd (KL at T = 2 + 0.2 CE, ``app.distill.losses``) against the
   teacher in bf16 on packed real text, the loss per step.
Install the kernels first on the H200 (wheels and the pip line in ../shared/wheels/README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KERNEL_FUNCS = ("mamba2_split_conv1d_scan_combined", "mamba2_selective_state_update", "mamba2_chunk_scan",
                "causal_conv1d_fn", "causal_conv1d_update")


def torch_path(enable: bool) -> dict:
    """Swap transformers' Mamba-2 kernel entry points (in its mamba2 and bamba modules) for their torch fallbacks
    (enable) or back; returns {name: 'kernel' | 'torch'} of what is in place afterwards (bamba's)."""
    import transformers.models.bamba.modeling_bamba as mb
    import transformers.models.mamba2.modeling_mamba2 as m2

    state = {}
    for mm in (m2, mb):
        state = _swap(mm, enable)
    return state


def _swap(mm, enable: bool) -> dict:
    state = {}
    for name in KERNEL_FUNCS:
        fn = getattr(mm, name, None)
        if fn is None:
            continue
        orig = getattr(mm, f"_distillery_orig_{name}", None)
        if orig is None:
            setattr(mm, f"_distillery_orig_{name}", fn)
            orig = fn
        fallback = getattr(orig, "__wrapped__", orig)
        setattr(mm, name, fallback if enable else orig)
        impl = getattr(mm, name)
        inner = getattr(impl, "__wrapped__", None)
        state[name] = "torch" if enable or inner is None or _is_torch_impl(impl) else "kernel"
    return state


def _is_torch_impl(fn) -> bool:
    """True when transformers' wrapper fell back to its own torch function (no kernel package found)."""
    for cell in getattr(fn, "__closure__", None) or ():
        v = cell.cell_contents
        if isinstance(v, bool) and v is False:  # is_new_implementation
            return True
    return False


def throughput(student, vocab: int, batch: int, seq: int, steps: int, device: str, dtype) -> float:
    import torch

    x = torch.randint(0, vocab, (batch, seq + 1), device=device)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=1e-6)

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = student(input_ids=x[:, :-1], labels=x[:, 1:], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (kernel autotuning)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * seq * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--distill-steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--arch", default="hybrid", choices=["hybrid", "mamba2"])
    ap.add_argument("--attention", default="1/4", help="hybrid: the share of attention layers kept")
    ap.add_argument("--out", default="out/gpu_distill")
    ap.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny sizes: checks the script runs")
    args = ap.parse_args()
    import torch

    from app.distill.losses import kd_ce_loss
    from app.distill.student import build_student
    from app.models import load_causal_lm

    if args.smoke:
        args.seq_len, args.batch, args.steps, args.distill_steps = 32, 2, 2, 3
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    teacher = load_causal_lm(args.teacher, device=device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "seq_len": args.seq_len,
              "batch": args.batch, "dtype": str(dtype), "arch": args.arch, "attention": args.attention}
    try:
        import mamba_ssm  # noqa: F401

        report["mamba_ssm"] = mamba_ssm.__version__
    except ImportError:
        report["mamba_ssm"] = None
    rows = {}
    for name, force_torch in (("as_imported", False), ("torch_path", True)):
        impl = torch_path(force_torch)
        student, _ = build_student(teacher.model, args.arch, attention_layers=args.attention, init="attention")
        student.to(device)
        n = sum(p.numel() for p in student.parameters()) - student.get_input_embeddings().weight.numel()
        tps = throughput(student, teacher.model.config.vocab_size, args.batch, args.seq_len, args.steps, device, dtype)
        rows[name] = {"implementations": impl, "tokens_per_s": tps, "non_embedding_params": n,
                      "mfu": 6 * n * tps / (args.peak_tflops * 1e12)}
        print(f"{name:12s} {tps:12.0f} tok/s  MFU {100 * rows[name]['mfu']:.2f}%  {impl}", flush=True)
        del student
        if device == "cuda":
            torch.cuda.empty_cache()
    torch_path(False)
    report["throughput"] = rows
    report["kernel_speedup"] = rows["as_imported"]["tokens_per_s"] / rows["torch_path"]["tokens_per_s"]

    # a short distillation (stage kd) on real text
    from app.refine.sample import collect_texts

    tok = teacher.tokenizer
    ids = []
    for _, t in collect_texts():
        ids.extend(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        if len(ids) > args.batch * (args.seq_len + 1) * args.distill_steps:
            break
    width = args.seq_len + 1
    data = torch.tensor(ids[: (len(ids) // width) * width]).view(-1, width)
    student, _ = build_student(teacher.model, args.arch, attention_layers=args.attention, init="attention")
    student.to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for step in range(args.distill_steps):
        rows_ = data[torch.arange(step * args.batch, (step + 1) * args.batch) % len(data)].to(device)
        x, y = rows_[:, :-1], rows_[:, 1:]
        mask = torch.ones_like(x, dtype=torch.bool)
        with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            th = teacher.model.model(input_ids=x, use_cache=False).last_hidden_state
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            h = student.base_model(input_ids=x, use_cache=False).last_hidden_state
        kd, ce = kd_ce_loss(h, student.get_output_embeddings().weight, mask, y, teacher_hidden=th, teacher_head=teacher.model.lm_head.weight,
                            temperature=2.0)
        (kd + 0.2 * ce).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append({"step": step + 1, "kd": float(kd), "ce": float(ce)})
        print(f"distill step {step + 1}: kd {float(kd):.4f} ce {float(ce):.4f}", flush=True)
    report["distill_losses"] = losses
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_distill.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"kernels vs torch path: {report['kernel_speedup']:.2f}x; report: {os.path.join(args.out, 'gpu_distill.json')}")


if __name__ == "__main__":
    main()
