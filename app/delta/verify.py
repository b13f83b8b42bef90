"""``delta verify``: how much of the tuned-minus-base delta an adapter carries.

Per LoRA module (weights streamed one module at a time): energy kept = ||B A||^2 / ||delta||^2 and the
relative Frobenius error ||delta - B A|| / ||delta|| (PEFT's scaling applied; Conv1D and embedding layouts
handled). Functionally, on sample texts (a file, one text per line or JSONL with "text"; default: text
already on the machine): mean per-token KL(tuned || base + adapter) and the perplexity of the tuned model
and of base + adapter.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from app.delta.checkpoint import Checkpoint, module_kinds


def _scaling(cfg: dict, module: str) -> float:
    import re

    r, alpha = cfg["r"], cfg["lora_alpha"]
    for pat, v in (cfg.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pat}", module):
            r = v
    for pat, v in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pat}", module):
            alpha = v
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def module_errors(base: str, tuned: str, adapter: str) -> dict:
    import torch
    from safetensors import safe_open

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    kinds, _, _ = module_kinds(t_ck)
    out = {}
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as h:
        keys = set(h.keys())
        for key in sorted(keys):
            if key.endswith(".lora_A.weight"):
                mod = key[len("base_model.model."):-len(".lora_A.weight")]
                a, b = h.get_tensor(key).float(), h.get_tensor(key.replace("lora_A", "lora_B")).float()
                approx = (b @ a) * _scaling(cfg, mod)
                if kinds.get(mod) == "conv1d":
                    approx = approx.T
            elif key.endswith(".lora_embedding_A"):
                mod = key[len("base_model.model."):-len(".lora_embedding_A")]
                a, b = h.get_tensor(key).float(), h.get_tensor(key.replace("lora_embedding_A", "lora_embedding_B")).float()
                approx = (b @ a).T * _scaling(cfg, mod)
            else:
                continue
            w = f"{mod}.weight"
            delta = t_ck.get(w).float() - b_ck.get(w).float()
            d2 = float((delta.double() ** 2).sum())
            err = float(torch.linalg.matrix_norm(delta - approx))
            out[mod] = {"rank": a.shape[0], "energy_kept": float((approx.double() ** 2).sum()) / d2 if d2 else None,
                        "rel_error": err / math.sqrt(d2) if d2 else None, "delta_sq": d2}
    return out


def _texts(path: Optional[str], n: int) -> list[str]:
    if path is None:
        from app.refine.sample import collect_texts

        return [t for _, t in collect_texts()][:n]
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    line = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    pass
            out.append(line)
    return out[:n]


def functional(base: str, tuned: str, adapter: str, texts: list[str], max_tokens: int) -> dict:
    import torch

    from app.delta.apply import load_adapted
    from app.models import load_causal_lm

    t_lm = load_causal_lm(tuned)
    adapted, _ = load_adapted(adapter, base)
    tok = t_lm.tokenizer
    kl_sum, n_tok, nll_t, nll_a = 0.0, 0, 0.0, 0.0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        with torch.no_grad():
            lt = torch.log_softmax(t_lm.model(input_ids=x).logits[0, :-1].float(), -1)
            la = torch.log_softmax(adapted(input_ids=x).logits[0, :-1].float(), -1)
        y = x[0, 1:]
        kl_sum += float((lt.exp() * (lt - la)).sum())
        nll_t -= float(lt.gather(1, y[:, None]).sum())
        nll_a -= float(la.gather(1, y[:, None]).sum())
        n_tok += len(y)
    if not n_tok:
        return {"texts": 0, "tokens": 0}
    return {"texts": len(texts), "tokens": n_tok, "kl_tuned_vs_adapted": kl_sum / n_tok,
            "perplexity_tuned": math.exp(nll_t / n_tok), "perplexity_adapted": math.exp(nll_a / n_tok)}


def overall_error(mods: dict) -> Optional[float]:
    """The relative Frobenius error over all decomposed matrices: sqrt(sum ||delta - BA||^2 / sum ||delta||^2)."""
    den = sum(m["delta_sq"] for m in mods.values() if m["rel_error"] is not None)
    num = sum(m["rel_error"] ** 2 * m["delta_sq"] for m in mods.values() if m["rel_error"] is not None)
    return math.sqrt(num / den) if den else None


def verify(base: str, tuned: str, adapter: str, *, texts: Optional[str] = None, n_texts: int = 32,
           max_tokens: int = 256) -> dict:
    mods = module_errors(base, tuned, adapter)
    report = {"base": base, "tuned": tuned, "adapter": adapter, "modules": mods,
              "functional": functional(base, tuned, adapter, _texts(texts, n_texts), max_tokens)}
    errs = [m["rel_error"] for m in mods.values() if m["rel_error"] is not None]
    report["summary"] = {"modules": len(mods), "max_rel_error": max(errs) if errs else None,
                         "rel_error": overall_error(mods),
                         "mean_energy_kept": (sum(m["energy_kept"] for m in mods.values() if m["energy_kept"] is not None)
                                              / len(errs)) if errs else None}
    return report


def table(report: dict) -> str:
    lines = [f"{'module':60s} {'rank':>5s} {'energy':>9s} {'rel err':>9s}"]
    for m, v in report["modules"].items():
        lines.append(f"{m:60s} {v['rank']:5d} {v['energy_kept'] or 0:9.5f} {v['rel_error'] or 0:9.2e}")
    f = report["functional"]
    if f.get("tokens"):
        lines.append(f"KL(tuned || base+adapter) {f['kl_tuned_vs_adapted']:.3e} nats/token over {f['tokens']} tokens; "
                     f"perplexity tuned {f['perplexity_tuned']:.3f}, base+adapter {f['perplexity_adapted']:.3f}")
    return "\n".join(lines)
