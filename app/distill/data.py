"""Training data for distillation: the refined Parquet, tokenized and packed with Ray Data, then read by each
training worker at a deterministic, seekable position.

    prepare_data   Ray Data: read the refined Parquet (id, text) -> ``TokenizePack`` (an actor pool, the
                   tokenizer loaded once per actor): each document's tokens + EOS, documents split into train /
                   eval by a hash of their id, each split's token stream of the batch cut into rows of
                   seq_len + 1 tokens, and the batch's remainder (< seq_len + 1 tokens per split) kept as a tail
                   -> Parquet, partitioned by split and kind; then ``pack_tails`` joins each split's tails, across
                   all batches, into more rows (streamed: one batch of tails in memory), so a split loses at most
                   one remainder in total, not one per batch (a held-out split of 1% gives ~2 documents per
                   256-document batch: dropped per batch, it would never make a row). Written into a fresh
                   directory that is renamed into place, then ``meta.json`` (atomically): a run stopped anywhere
                   leaves no rows that a later run would count; under a file lock, so runs that share the cache
                   pack once. Reused while (input, tokenizer, seq_len, split, format) are unchanged.
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
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

# what a packed directory holds: 2 = each split's per-batch remainders packed across batches (1 dropped them)
PACK_FORMAT = 2
ROW, TAIL = "row", "tail"


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
        pieces, splits, kinds = [], [], []  # full rows of `width` tokens, then the split's tail (shorter)
        for split, stream in streams.items():
            arr = np.asarray(stream, dtype=np.int32)
            n = len(arr) // self.width
            pieces += [arr[i * self.width:(i + 1) * self.width] for i in range(n)]
            splits += [split] * n
            kinds += [ROW] * n
            if len(arr) > n * self.width:
                pieces.append(arr[n * self.width:])
                splits.append(split)
                kinds.append(TAIL)
        offsets = np.cumsum([0, *(len(p) for p in pieces)]).astype(np.int32)
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
                         "split": pa.array(splits, type=pa.string()), "kind": pa.array(kinds, type=pa.string())})


def pack_tails(files: list[str], width: int, out_path: str, rows_per_group: int = 4096) -> tuple[int, int]:
    """Join the tails in ``files`` (in order) into one stream and cut it into rows of ``width`` tokens, written to
    ``out_path`` (no file when there is no full row). Streams: one batch of tails and < ``width`` carried tokens in
    memory. Returns (rows written, tokens left over: < width)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    carry = np.zeros(0, dtype=np.int32)
    writer, rows = None, 0
    try:
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(columns=["ids"], batch_size=rows_per_group):
                carry = np.concatenate([carry, rb.column(0).flatten().to_numpy().astype(np.int32)])
                n = len(carry) // width
                if not n:
                    continue
                table = pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(carry[: n * width]), width)})
                if writer is None:
                    writer = pq.ParquetWriter(out_path, table.schema)
                writer.write_table(table)
                rows += n
                carry = carry[n * width:]
    finally:
        if writer is not None:
            writer.close()
    return rows, len(carry)


@dataclass
class PackedData:
    root: str
    train: list[str]
    eval: list[str]
    train_rows: int
    eval_rows: int
    seq_len: int
    eval_tokens: Optional[int] = None
    """Tokens of the held-out documents (with their EOS), packed or not: rows = eval_tokens // (seq_len + 1)."""

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


def _write_json(path: str, obj: dict) -> None:
    """``obj`` as JSON at ``path``, atomically (a stopped run leaves the old file or none, never half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _pack(ds, data_cfg, tmp: str) -> dict:
    """Write the packed rows of ``ds`` under ``tmp``/split=S/ (full rows as the actors cut them + each split's
    tails packed across batches); returns {split: tokens of that split}."""
    import pyarrow.parquet as pq

    width = data_cfg.seq_len + 1
    stage = os.path.join(tmp, "_stage")
    ds.write_parquet(stage, partition_cols=["split", "kind"])
    tokens = {}
    for s in ("train", "eval"):
        dest = os.path.join(tmp, f"split={s}")
        os.makedirs(dest, exist_ok=True)
        full = sorted(glob.glob(os.path.join(stage, f"split={s}", f"kind={ROW}", "*.parquet")))
        for f in full:
            os.replace(f, os.path.join(dest, os.path.basename(f)))
        tails = sorted(glob.glob(os.path.join(stage, f"split={s}", f"kind={TAIL}", "*.parquet")))
        n_tail_rows, left = pack_tails(tails, width, os.path.join(dest, "tails.parquet"))
        n_full = sum(pq.ParquetFile(os.path.join(dest, os.path.basename(f))).metadata.num_rows for f in full)
        tokens[s] = (n_full + n_tail_rows) * width + left
    shutil.rmtree(stage)
    return tokens


def prepare_data(data_cfg, tokenizer_ref: str, cache_dir: str) -> PackedData:
    """Tokenize and pack ``data_cfg.input`` into ``cache_dir/packed/KEY`` (reused while the inputs, tokenizer and
    packing are unchanged; see the module doc)."""
    import ray
    from filelock import FileLock

    files = _inputs(data_cfg.input)
    key = hashlib.sha256(json.dumps({
        "files": [(os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files],
        "tokenizer": tokenizer_ref, "seq_len": data_cfg.seq_len, "eval_fraction": data_cfg.eval_fraction,
        "max_docs": data_cfg.max_docs, "text": data_cfg.text_field, "id": data_cfg.id_field,
        "format": PACK_FORMAT}).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir, "packed", key)
    meta_path = os.path.join(root, "meta.json")
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(cache_dir, "packed", f"{key}.lock")):  # runs sharing the cache pack once
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                packed = PackedData(**json.load(f))
            log.info("packed data: reusing %s (%d train rows, %d eval rows)", root, packed.train_rows,
                     packed.eval_rows)
            return packed
        import pyarrow.parquet as pq

        names = set(pq.read_schema(files[0]).names)
        if data_cfg.text_field not in names:
            raise ValueError(f"{files[0]}: no column {data_cfg.text_field!r} (data.text_field); columns: "
                             f"{sorted(names)}")
        rows_dir, tmp = os.path.join(root, "rows"), os.path.join(root, "rows.partial")
        for d in (rows_dir, tmp):  # what a run stopped before its meta.json left: never appended to, never counted
            shutil.rmtree(d, ignore_errors=True)
        ds = ray.data.read_parquet(files, columns=[c for c in (data_cfg.id_field, data_cfg.text_field) if c in names])
        if data_cfg.max_docs is not None:
            ds = ds.limit(data_cfg.max_docs)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ds.map_batches(TokenizePack, fn_constructor_args=(tokenizer_ref, data_cfg.seq_len, data_cfg.eval_fraction,
                                                               data_cfg.text_field, data_cfg.id_field),
                            batch_size=256, batch_format="pyarrow", concurrency=(1, cpus))
        tokens = _pack(ds, data_cfg, tmp)
        os.rename(tmp, rows_dir)
        split_files = {s: sorted(glob.glob(os.path.join(rows_dir, f"split={s}", "*.parquet")))
                       for s in ("train", "eval")}
        counts = {s: sum(pq.ParquetFile(f).metadata.num_rows for f in fs) for s, fs in split_files.items()}
        if counts["train"] == 0:
            raise ValueError(f"{data_cfg.input}: no training rows of {data_cfg.seq_len + 1} tokens (too little text?)")
        packed = PackedData(root=root, train=split_files["train"], eval=split_files["eval"], train_rows=counts["train"],
                            eval_rows=counts["eval"], seq_len=data_cfg.seq_len, eval_tokens=tokens["eval"])
        _write_json(meta_path, packed.to_dict())
    log.info("packed data: %d train rows, %d eval rows of %d tokens in %s", counts["train"], counts["eval"],
             data_cfg.seq_len + 1, root)
    return packed


def check_eval_split(packed: PackedData, data_cfg, needed: int = 1) -> None:
    """Refuse, before any training, a held-out split with fewer than ``needed`` rows (held-out evaluation, Tune's
    metric, would have nothing to score)."""
    if packed.eval_rows >= needed:
        return
    have = "" if packed.eval_tokens is None else f" ({packed.eval_tokens} tokens)"
    raise ValueError(f"the held-out split has {packed.eval_rows} rows of {data_cfg.seq_len + 1} tokens{have}, "
                     f"{needed} needed: the documents that data.eval_fraction ({data_cfg.eval_fraction}) holds out of "
                     f"{data_cfg.input} are too few. Raise data.eval_fraction, lower data.seq_len, or give more text")


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
