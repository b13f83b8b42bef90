"""Toxicity with Detoxify checkpoints, every token scored (long documents in chunks, max over chunks).

Checkpoints are Detoxify's own format (a dict with ``config`` and ``state_dict``), read with
``torch.load(weights_only=True)``: Detoxify itself unpickles arbitrary objects, which DESIGN.md rules out
for files we did not make. The transformers model and tokenizer are then built as Detoxify builds them
(``config.arch.args``: model_type, model_name, tokenizer_name, num_classes), except that the HF config
and tokenizer come from ``hf_config_path`` when given, so nothing is fetched from a hub.

Where a checkpoint comes from: ``checkpoint`` when set, otherwise the file Detoxify would have
downloaded for ``variant`` in the torch hub cache (``torch.hub.get_dir()/checkpoints/``).
Columns: ``tox_<label>`` per class (Detoxify's standardised names) and ``toxicity`` = the max of them.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pyarrow as pa

VARIANTS = {  # Detoxify's release files, by variant
    "original": "toxic_original-c1212f89.ckpt",
    "unbiased": "toxic_debiased-c7548aa0.ckpt",
    "multilingual": "multilingual_debiased-0b549669.ckpt",
}
RENAME = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


class ToxicityUnavailable(RuntimeError):
    """The Detoxify checkpoint cannot be loaded; the message is one line saying why."""


def checkpoint_path(variant: str, checkpoint: Optional[str]) -> str:
    if checkpoint:
        return checkpoint
    import torch

    if variant not in VARIANTS:
        raise ToxicityUnavailable(f"toxicity: unknown variant '{variant}' (one of {', '.join(VARIANTS)})")
    return os.path.join(torch.hub.get_dir(), "checkpoints", VARIANTS[variant])


def load_detoxify(variant: str = "original", checkpoint: Optional[str] = None, hf_config_path: Optional[str] = None,
                  device: str = "cpu"):
    """(model, tokenizer, class names) from a Detoxify checkpoint; ToxicityUnavailable with one clear line."""
    import torch
    import transformers

    path = checkpoint_path(variant, checkpoint)
    if not os.path.isfile(path):
        raise ToxicityUnavailable(f"toxicity: no Detoxify checkpoint at {path} (set toxicity.checkpoint, or put the "
                                  f"'{variant}' release file in the torch hub cache)")
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
        args = loaded["config"]["arch"]["args"]
        classes = [RENAME.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        source = hf_config_path or args["model_type"]
        model_class = getattr(transformers, args["model_name"])
        config = model_class.config_class.from_pretrained(source, num_labels=args["num_classes"])
        model = model_class.from_pretrained(None, config=config, state_dict=loaded["state_dict"])
        tokenizer = getattr(transformers, args["tokenizer_name"]).from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - one clear line
        raise ToxicityUnavailable(f"toxicity: cannot load {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer, classes


class ToxicityScorer:
    """Ray Data callable class: text -> ``tox_<label>`` columns and ``toxicity`` (model loaded once)."""

    def __init__(self, variant: str = "original", checkpoint: Optional[str] = None, hf_config_path: Optional[str] = None,
                 *, device: Optional[str] = None, batch_size: int = 32, max_length: Optional[int] = None,
                 column: str = "text"):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok, self.classes = load_detoxify(variant, checkpoint, hf_config_path, self.device)
        if self.device.startswith("cuda"):
            self.model.to(torch.bfloat16)
        limit = max_length or min(self.tok.model_max_length, self.model.config.max_position_embeddings)
        # The special tokens around one sequence ([CLS] ... [SEP], <s> ... </s>), read off a probe.
        core = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a")["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(core)] == core)
        self.prefix, self.suffix = full[:at], full[at + len(core):]
        self.chunk = limit - len(self.prefix) - len(self.suffix)  # content tokens per chunk
        self.batch_size = batch_size
        self.column = column  # null entries are not scored

    def chunks(self, text: str) -> list[list[int]]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        parts = [ids[i : i + self.chunk] for i in range(0, len(ids), self.chunk)] or [[]]
        return [self.prefix + p + self.suffix for p in parts]

    def score(self, texts: list[Optional[str]]) -> np.ndarray:
        """(N, classes) probabilities: the max over each document's chunks (NaN rows for None)."""
        import torch

        seqs, owner = [], []
        for d, t in enumerate(texts):
            if t is None:
                continue
            for c in self.chunks(t):
                seqs.append(c)
                owner.append(d)
        out = np.full((len(texts), len(self.classes)), np.nan)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # length buckets: little padding
        pad = self.tok.pad_token_id or 0
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            for r, i in enumerate(idx):
                d = owner[i]
                out[d] = probs[r] if np.isnan(out[d, 0]) else np.maximum(out[d], probs[r])
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        probs = self.score(table.column(self.column).to_pylist())
        for j, name in enumerate(self.classes):
            col = [None if np.isnan(v) else float(v) for v in probs[:, j]]
            table = table.append_column(f"tox_{name}", pa.array(col, pa.float64()))
        top = [None if np.isnan(r).all() else float(np.nanmax(r)) for r in probs]
        return table.append_column("toxicity", pa.array(top, pa.float64()))
