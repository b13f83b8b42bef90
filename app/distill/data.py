"""Training data for distillation: the refined Parquet, tokenized and packed with Ray Data, then read by each
training worker at a deterministic, seekable position.

    prepare_data   Ray Data: read the refined Parquet (id, text) -> ``TokenizePack`` (an actor pool, the
                   tokenizer loaded once per actor): each document's tokens + EOS, documents split into train /
                   eval by a hash of their id, each split's token stream cut into rows of seq_len + 1 tokens
                   (the remainder of each batch's stream, < seq_len + 1 tokens, is dropped) -> Parquet,
                   partitioned by split, written once per (input, tokenizer, seq_len, split) and reused
    PackedRows     a worker's view of the packed rows: row counts from the Parquet footers, rows read by global
                   index (one file cached), so a resumed run seeks straight to its position
    batch_rows     which rows make global batch g: batches are fixed groups of rows, their order shuffled per
                   epoch with a seeded permutation; worker ``rank`` of ``world`` takes batch step * world + rank
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def eval_split(doc_id: str, fraction: float) -> bool:
    """True for the documents held out: a stable hash of the id below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2.0 ** 64 < fraction


class TokenizePack:
    """Ray Data ``map_batches`` callable: documents -> packed rows {ids: seq_len + 1 token ids, split}."""

    def __init__(self, tokenizer_ref: str, seq_len: int, eval_fraction: float, text_field: str, id_field: str):
        from app.models import load_tokenizer

        self.tok = load_tokenizer(tokenizer_ref)
        self.eos = self.tok.eos_token_id
        self.width = seq_len + 1
        self.eval_fraction = eval_fraction
        self.text_field, self.id_field = text_field, id_field

    def __call__(self, batch):
        import pyarrow as pa

        texts = batch.column(self.text_field).to_pylist()
        # without an id column the text itself decides the split (stable, and the same in every batch)
        ids = batch.column(self.id_field).to_pylist() if self.id_field in batch.column_names else \
            [t or "" for t in texts]
        enc = self.tok([t or "" for t in texts], add_special_tokens=False)["input_ids"]
        streams: dict[str, list[int]] = {"train": [], "eval": []}
        for doc_id, toks in zip(ids, enc):
            streams["eval" if eval_split(str(doc_id), self.eval_fraction) else "train"].extend([*toks, self.eos])
        rows, splits = [], []
        for split, stream in streams.items():
            n = len(stream) // self.width
            if n:
                rows.append(np.asarray(stream[: n * self.width], dtype=np.int32))
                splits += [split] * n
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
        return pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(flat), self.width),
                         "split": pa.array(splits, type=pa.string())})


@dataclass
class PackedData:
    root: str
    train: list[str]
    eval: list[str]
    train_rows: int
    eval_rows: int
    seq_len: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _inputs(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"no Parquet files at {path}")
    return files


def prepare_data(data_cfg, tokenizer_ref: str, cache_dir: str) -> PackedData:
    """Tokenize and pack ``data_cfg.input`` into ``cache_dir/packed/KEY`` (reused while the inputs, tokenizer and
    packing are unchanged)."""
    import ray

    files = _inputs(data_cfg.input)
    key = hashlib.sha256(json.dumps({
        "files": [(os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files],
        "tokenizer": tokenizer_ref, "seq_len": data_cfg.seq_len, "eval_fraction": data_cfg.eval_fraction,
        "max_docs": data_cfg.max_docs, "text": data_cfg.text_field, "id": data_cfg.id_field}).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir, "packed", key)
    meta_path = os.path.join(root, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            packed = PackedData(**json.load(f))
        log.info("packed data: reusing %s (%d train rows, %d eval rows)", root, packed.train_rows, packed.eval_rows)
        return packed
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    if data_cfg.text_field not in names:
        raise ValueError(f"{files[0]}: no column {data_cfg.text_field!r} (data.text_field); columns: {sorted(names)}")
    ds = ray.data.read_parquet(files, columns=[c for c in (data_cfg.id_field, data_cfg.text_field) if c in names])
    if data_cfg.max_docs is not None:
        ds = ds.limit(data_cfg.max_docs)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ds.map_batches(TokenizePack, fn_constructor_args=(tokenizer_ref, data_cfg.seq_len, data_cfg.eval_fraction,
                                                           data_cfg.text_field, data_cfg.id_field),
                        batch_size=256, batch_format="pyarrow", concurrency=(1, cpus))
    ds.write_parquet(os.path.join(root, "rows"), partition_cols=["split"])
    split_files = {s: sorted(glob.glob(os.path.join(root, "rows", f"split={s}", "*.parquet"))) for s in ("train", "eval")}

    counts = {s: sum(pq.ParquetFile(f).metadata.num_rows for f in fs) for s, fs in split_files.items()}
    if counts["train"] == 0:
        raise ValueError(f"{data_cfg.input}: no training rows of {data_cfg.seq_len + 1} tokens (too little text?)")
    packed = PackedData(root=root, train=split_files["train"], eval=split_files["eval"], train_rows=counts["train"],
                        eval_rows=counts["eval"], seq_len=data_cfg.seq_len)
    with open(meta_path, "w") as f:
        json.dump(packed.to_dict(), f, indent=1)
    log.info("packed data: %d train rows, %d eval rows of %d tokens in %s", counts["train"], counts["eval"],
             data_cfg.seq_len + 1, root)
    return packed


class PackedRows:
    """Rows of packed token ids by global index, across the Parquet files of one split."""

    def __init__(self, files: list[str]):
        import pyarrow.parquet as pq

        self.files = files
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
        self.offsets = np.cumsum([0, *counts])
        self.rows = int(self.offsets[-1])
        self._cached: tuple[int, np.ndarray] | None = None

    def _file(self, i: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != i:
            import pyarrow.parquet as pq

            col = pq.read_table(self.files[i], columns=["ids"]).column("ids").combine_chunks()
            width = col.type.list_size if hasattr(col.type, "list_size") else None
            flat = col.flatten().to_numpy()
            width = width or (len(flat) // len(col) if len(col) else 1)
            self._cached = (i, flat.reshape(len(col), width))
        return self._cached[1]

    def take(self, index: np.ndarray) -> np.ndarray:
        """(len(index), seq_len + 1) int64 rows at these global indices."""
        out = []
        for r in index:
            i = int(np.searchsorted(self.offsets, r, side="right")) - 1
            out.append(self._file(i)[r - self.offsets[i]])
        return np.stack(out).astype(np.int64)


def batch_rows(step: int, rank: int, world: int, batch_size: int, rows: int, seed: int) -> np.ndarray:
    """Global row indices of worker ``rank``'s batch at ``step`` (see the module doc)."""
    n_batches = rows // batch_size
    if n_batches == 0:
        raise ValueError(f"{rows} packed rows are fewer than one batch of {batch_size}")
    g = step * world + rank
    epoch, pos = divmod(g, n_batches)
    order = np.random.default_rng([seed, epoch]).permutation(n_batches)
    b = int(order[pos])
    return np.arange(b * batch_size, (b + 1) * batch_size)
