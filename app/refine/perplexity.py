"""Perplexity of documents under a reference causal LM, batched by length.

Two Ray Data steps:
    Tokenize            CPU, callable class (loads the tokenizer once): adds ``_ppl_ids`` (list<int32>),
                        the BOS id (when the tokenizer has one) followed by the document's tokens.
    PerplexityScorer    GPU or CPU actor, callable class (loads the model once): adds ``ppl_nll`` (mean
                        token NLL, nats), ``perplexity`` (exp of it) and ``ppl_tokens`` (tokens scored).

Segments. ``window: first`` scores the first ``max_tokens`` tokens. ``window: sliding`` scores every
token: segments of ``max_tokens`` tokens, each after the first starting ``context`` tokens early so the
tokens it scores see at least that much context; every token is scored exactly once.

Batching. Segments are sorted by length and packed into micro-batches whose padded size
(longest × count) stays within ``batch_tokens``, so padding is at most one length bucket; results are
written back in the input order. Logits are computed in chunks of ``logit_chunk`` tokens over the real
(non-padding) positions only, so a 49k vocabulary never materialises (B, T, V) logits.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pyarrow as pa


class Tokenize:
    """Ray Data callable class: text -> ``_ppl_ids``."""

    def __init__(self, model_ref: str, max_tokens: int, window: str, column: str = "text"):
        from app.models import resolve
        from transformers import AutoTokenizer

        name, kwargs = resolve(model_ref)
        self.tok = AutoTokenizer.from_pretrained(name, **kwargs)
        self.limit = max_tokens if window == "first" else None
        self.column = column  # null entries are not tokenized (not scored)

    def ids(self, texts: list[Optional[str]]) -> list[Optional[list[int]]]:
        bos = self.tok.bos_token_id
        real = [t for t in texts if t is not None]
        enc = self.tok(real, add_special_tokens=False)["input_ids"] if real else []
        out, j = [], 0
        for t in texts:
            if t is None:
                out.append(None)
                continue
            ids = ([bos] if bos is not None else []) + enc[j]
            j += 1
            out.append(ids[: self.limit] if self.limit else ids)
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        ids = self.ids(table.column(self.column).to_pylist())
        return table.append_column("_ppl_ids", pa.array(ids, type=pa.list_(pa.int32())))


def segments(ids: list[int], max_tokens: int, window: str, context: int) -> list[tuple[list[int], int]]:
    """(segment ids, index of the first position whose token is scored) for one document.

    Position 0 of a document is never scored (nothing predicts it); with a BOS prepended that is the BOS.
    """
    if len(ids) < 2:
        return []
    if window == "first" or len(ids) <= max_tokens:
        return [(ids[:max_tokens], 1)]
    out = [(ids[:max_tokens], 1)]
    start = max_tokens  # first token not yet scored
    while start < len(ids):
        lo = start - context
        out.append((ids[lo : lo + max_tokens], context))
        start = lo + max_tokens
    return out


def pack(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into micro-batches: longest first, padded size (max len x count) <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and longest * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def list_arrays(column: pa.ChunkedArray) -> list[Optional[np.ndarray]]:
    """A list<int> column as numpy views per row (None for nulls), without building Python lists."""
    out: list[Optional[np.ndarray]] = []
    for chunk in column.chunks:
        flat = chunk.values.to_numpy(zero_copy_only=False)  # values of the whole chunk (incl. before its offset)
        offsets = chunk.offsets.to_numpy()
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        out.extend(flat[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(chunk)))
    return out


class PerplexityScorer:
    """Ray Data callable class: ``_ppl_ids`` -> ``ppl_nll``, ``perplexity``, ``ppl_tokens`` (model loaded once)."""

    def __init__(self, model_ref: str, *, max_tokens: int = 1024, batch_tokens: int = 16384, window: str = "first",
                 context: Optional[int] = None, device: Optional[str] = None, logit_chunk: int = 2048,
                 dtype: str = "auto"):
        import torch

        from app.heads import HeadLogits
        from app.models import load_causal_lm

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lm = load_causal_lm(model_ref, device=self.device,
                                 dtype=None if dtype == "auto" else getattr(torch, dtype))
        self.max_tokens = max_tokens
        self.batch_tokens = max(batch_tokens, max_tokens)
        self.window = window
        self.context = max_tokens // 4 if context is None else context
        self.logit_chunk = logit_chunk
        self.pad_id = self.lm.tokenizer.pad_token_id or 0
        # logits through the model's own head path (Granite's logits_scaling, Gemma 2/3's soft-cap, ...), the head
        # in the model's dtype (bf16 on CUDA), the logits in fp32
        self.head = HeadLogits(self.lm.model, fp32=False)

    def _forward(self, segs: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Sum of NLL and number of scored tokens per segment, one micro-batch."""
        import torch

        model = self.lm.model
        T = max(len(s) for s, _ in segs)
        ids = np.full((len(segs), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(segs), T), dtype=np.int64)
        score = np.zeros((len(segs), T), dtype=np.bool_)  # positions whose token is scored
        for r, (s, first) in enumerate(segs):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
            score[r, first : len(s)] = True
        pin = self.device.startswith("cuda")
        ids, mask, score = (torch.from_numpy(a).pin_memory().to(self.device, non_blocking=True) if pin
                            else torch.from_numpy(a) for a in (ids, mask, score))
        with torch.inference_mode():
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            # position t predicts token t+1: keep the hidden states whose next token is scored
            sel = score[:, 1:]  # (B, T-1)
            h = hidden[:, :-1][sel]  # (N, H)
            targets = ids[:, 1:][sel]  # (N,)
            rows = torch.arange(len(segs), device=self.device).unsqueeze(1).expand(-1, T - 1)[sel]  # (N,)
            nll = torch.empty(h.shape[0], dtype=torch.float32, device=self.device)
            for lo in range(0, h.shape[0], self.logit_chunk):
                logits = self.head(h[lo : lo + self.logit_chunk])  # (C, V) fp32
                nll[lo : lo + self.logit_chunk] = torch.nn.functional.cross_entropy(
                    logits, targets[lo : lo + self.logit_chunk], reduction="none")
            sums = torch.zeros(len(segs), dtype=torch.float64, device=self.device).index_add_(0, rows, nll.double())
            counts = torch.bincount(rows, minlength=len(segs))
        return sums.cpu().numpy(), counts.cpu().numpy()

    def score_ids(self, docs: list) -> tuple[np.ndarray, np.ndarray]:
        """Per document: sum of token NLL and tokens scored (0 for empty/None documents).

        ``docs``: token id sequences (lists or 1-d arrays), None for documents not scored."""
        segs, owner = [], []
        for d, ids in enumerate(docs):
            for seg in segments(ids if ids is not None else [], self.max_tokens, self.window, self.context):
                segs.append(seg)
                owner.append(d)
        nll = np.zeros(len(docs), dtype=np.float64)
        count = np.zeros(len(docs), dtype=np.int64)
        for batch in pack([len(s) for s, _ in segs], self.batch_tokens):
            sums, counts = self._forward([segs[i] for i in batch])
            for j, i in enumerate(batch):
                nll[owner[i]] += sums[j]
                count[owner[i]] += counts[j]
        return nll, count

    def __call__(self, table: pa.Table) -> pa.Table:
        nll_sum, count = self.score_ids(list_arrays(table.column("_ppl_ids")))
        mean = [float(s / c) if c else None for s, c in zip(nll_sum, count)]
        return (table.drop_columns(["_ppl_ids"])
                .append_column("ppl_nll", pa.array(mean, pa.float64()))
                .append_column("perplexity", pa.array([math.exp(m) if m is not None else None for m in mean], pa.float64()))
                .append_column("ppl_tokens", pa.array(count.tolist(), pa.int64())))


def naive_perplexity(lm, texts: list[str], max_tokens: int) -> list[float]:
    """The slow, obvious reference: one document per forward through the full model, HF's own loss."""
    import torch

    out = []
    bos = lm.tokenizer.bos_token_id
    for t in texts:
        ids = ([bos] if bos is not None else []) + lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids[:max_tokens]], device=lm.model.device)
        with torch.inference_mode():
            loss = lm.model(input_ids=ids, labels=ids).loss
        out.append(float(loss))
    return out
