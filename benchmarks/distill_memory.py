"""The distill job's memory estimate per worker (``app/distill/memory.py``) against the measured peak of a worker.

    python benchmarks/distill_memory.py [--teacher smollm2] [--cases "hybrid:1/4:4:256" ...]

Each case ``arch:attention:batch:seq_len`` runs in a fresh process what one training worker runs (no Ray): the
teacher loaded, the student built from it, AdamW, then two steps of stage align and two of stage kd (the
teacher live) with ``train.py``'s own module, and reports its peak RSS (``ru_maxrss``). The estimate for the same
config is printed beside it, with the ratio. The estimate should sit at or above the peak (it guards a node
against Ray's OOM monitor) without being far above it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(teacher_ref: str, arch: str, attention: str, batch: int, seq: int) -> dict:
    import torch

    from app.distill.losses import TeacherTopK  # noqa: F401 - the worker imports it too
    from app.distill.student import build_student
    from app.distill.train import TeacherTaps, _module
    from app.models import load_causal_lm

    torch.set_num_threads(1)
    lm = load_causal_lm(teacher_ref)
    t = lm.model.eval()
    student, _ = build_student(t, arch, attention_layers=attention)
    mod = _module()(student, 1024, False)
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    w = {"align_weight": 1.0, "kd_weight": 1.0, "kd_ce_weight": 0.0, "temperature": 2.0}
    for stage in ("align", "align", "kd", "kd"):
        ids = torch.randint(0, t.config.vocab_size, (batch, seq + 1), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
        mask = torch.ones_like(x, dtype=torch.bool)
        with torch.no_grad():
            if stage == "align":
                taps = TeacherTaps(t, mod.mixer_layers)
                t.model(input_ids=x, use_cache=False)
                ins, outs = taps.take()
                taps.remove()
                teach = {"attn_inputs": ins, "attn_outputs": outs}
            else:
                teach = {"hidden": t.model(input_ids=x, use_cache=False).last_hidden_state, "head": t.lm_head.weight}
        if stage == "align" and not mod.mixer_layers:
            continue
        mod(x, y, mask, stage, w, teach)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del teach
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--cases", nargs="+", default=["hybrid:1/4:2:256", "hybrid:1/4:4:256", "hybrid:0:4:256",
                                                     "hybrid:1/2:4:256", "mamba2:0:4:256"])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="out/bench_memory")
    args = ap.parse_args()
    if args.worker:
        arch, att, b, s = args.worker.split(":")
        print(json.dumps(worker(args.teacher, arch, att, int(b), int(s))))
        return 0
    from app.config import load_config
    from app.distill.config import DistillConfig
    from app.distill.memory import GiB, estimate
    from app.models import load_model_config

    tcfg = load_model_config(args.teacher)
    rows = []
    for case in args.cases:
        arch, att, b, s = case.split(":")
        proc = subprocess.run([sys.executable, __file__, "--teacher", args.teacher, "--worker", case],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:])
            return 1
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
        cfg = load_config(DistillConfig, None, [f"student.arch={arch}", f"student.attention_layers={att}",
                                                f"train.batch_size={b}", f"data.seq_len={s}"])
        est = estimate(cfg, tcfg)
        rows.append({"case": case, "peak_gib": peak / GiB, "estimate_gib": est.total / GiB, "ratio": est.total / peak,
                     "estimate": est.describe()})
        print(f"{case:20s} measured peak {peak / GiB:5.2f} GiB  estimate {est.total / GiB:5.2f} GiB  "
              f"(x{est.total / peak:.2f})  [{est.describe()}]", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distill_memory.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
