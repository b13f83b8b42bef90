"""The teacher's top-k logits for every packed training row, computed once with Ray Data and reused.

Stage kd then needs no teacher forward: its KL runs over the teacher's top k tokens (the teacher's
distribution renormalised over them, against the student's log-probabilities there; ``losses.py``).
Written under the packed data's directory as ``topk-K-TEACHERHASH/`` (the hash of the teacher and its dtype):
Parquet rows {row, ids, logits}, ids and logits flattened (seq_len * k), logits in fp32, through the teacher's own
head path (``teacher.py``). Runs sharing ``data.cache_dir`` (Tune trials) compute it once: under a file lock,
into a fresh directory renamed into place before ``meta.json``, so a stopped run leaves nothing a later one reads.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil

import numpy as np

log = logging.getLogger(__name__)


class TopKTeacher:
    """Ray Data callable: {row: global packed row index} -> {row, ids, logits} (the teacher loaded once)."""

    def __init__(self, teacher_ref: str, files: list[str], k: int, device: str, dtype: str = "float32"):
        import torch

        from app.distill.data import PackedRows
        from app.distill.teacher import HeadLogits
        from app.models import load_causal_lm

        self.lm = load_causal_lm(teacher_ref, device=device, dtype=getattr(torch, dtype))
        self.head = HeadLogits(self.lm.model)
        self.rows = PackedRows(files)
        self.k = k
        self.device = device

    def __call__(self, batch: dict) -> dict:
        import torch

        idx = np.asarray(batch["row"], dtype=np.int64)
        x = torch.from_numpy(self.rows.take(idx))[:, :-1].to(self.device)  # (B, T)
        from app.distill.teacher import body_hidden

        with torch.no_grad():
            h = body_hidden(self.lm.model, x)  # (B, T, d)
            vals, ids = [], []
            for b in range(h.shape[0]):  # one sequence's logits at a time: (T, V) fp32
                z = self.head(h[b])
                v, i = z.topk(self.k, dim=-1)
                vals.append(v.cpu().numpy().reshape(-1))
                ids.append(i.to(torch.int32).cpu().numpy().reshape(-1))
        return {"row": idx, "ids": np.stack(ids), "logits": np.stack(vals).astype(np.float32)}


def teacher_topk_cache(cfg, packed, out_dir: str) -> dict:
    """{files, k}: the top-k cache for ``packed``'s training rows, computed if missing."""
    import ray
    from filelock import FileLock

    from app.distill.data import _write_json

    k = cfg.cache.teacher_topk
    dtype = str(cfg.train.teacher_torch_dtype()).replace("torch.", "")
    tag = hashlib.sha256(json.dumps([cfg.teacher, dtype]).encode()).hexdigest()[:12]
    root = os.path.join(packed.root, f"topk-{k}-{tag}")
    meta = os.path.join(root, "meta.json")
    rows = os.path.join(root, "rows")
    os.makedirs(root, exist_ok=True)
    with FileLock(f"{root}.lock"):
        if not os.path.isfile(meta):
            use_gpu = cfg.train.use_gpu
            tmp = os.path.join(root, "rows.partial")
            for d in (rows, tmp):  # what a run stopped before its meta.json left
                shutil.rmtree(d, ignore_errors=True)
            ds = ray.data.range(packed.train_rows).rename_columns({"id": "row"})
            ds = ds.map_batches(TopKTeacher, fn_constructor_args=(cfg.teacher, packed.train, k,
                                                                  "cuda" if use_gpu else "cpu", dtype),
                                batch_size=max(1, cfg.train.batch_size), concurrency=1, num_gpus=1 if use_gpu else 0,
                                batch_format="numpy")
            ds.write_parquet(tmp)
            os.rename(tmp, rows)
            _write_json(meta, {"teacher": cfg.teacher, "dtype": dtype, "k": k, "rows": packed.train_rows})
            log.info("teacher top-%d cache written: %s", k, root)
        else:
            log.info("teacher top-%d cache: reusing %s", k, root)
    return {"files": sorted(glob.glob(os.path.join(rows, "*.parquet"))), "k": k}


class TopKRows:
    """The cached (ids, logits) of packed training rows by global row index."""

    def __init__(self, files: list[str], k: int):
        import pyarrow.parquet as pq

        self.k = k
        self.files = files
        self.where: dict[int, tuple[int, int]] = {}
        for i, f in enumerate(files):
            for j, r in enumerate(pq.read_table(f, columns=["row"]).column("row").to_numpy()):
                self.where[int(r)] = (i, j)
        self._cached: tuple[int, dict] | None = None

    def _file(self, i: int) -> dict:
        if self._cached is None or self._cached[0] != i:
            import pyarrow.parquet as pq

            t = pq.read_table(self.files[i], columns=["ids", "logits"])
            self._cached = (i, {c: np.stack(t.column(c).to_numpy(zero_copy_only=False)) for c in ("ids", "logits")})
        return self._cached[1]

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, T, k) int64 and logits (B, T, k) fp32 for these rows."""
        ids, logits = [], []
        for r in rows:
            i, j = self.where[int(r)]
            f = self._file(i)
            ids.append(f["ids"][j])
            logits.append(f["logits"][j])
        return np.stack(ids).reshape(len(rows), -1, self.k).astype(np.int64), np.stack(logits).reshape(len(rows), -1, self.k)
