"""Ray Data sinks that split one stream into several outputs and return per-shard counts.

``WorkSink``   parsed + scored records -> ``_work/docs/p=<part>/`` (hash-partitioned by id) and
               malformed records -> ``quarantine/``; returns per-source record/quarantine counts.
``FilesSink``  any blocks -> Parquet files.
``OutputSink`` decided records -> ``kept/`` and ``dropped/``; returns per-source keep/drop counts and the
               dashboard's profile (``app.refine.profile``).
File names derive from the write task index, so a retried task rewrites its own files; a file is written
under a hidden temporary name, fsync'd, and renamed into place when complete (the unit that owns the files
makes the renames durable: ``app.refine.resume.RefineRun.sync``).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from app.refine.io import QUARANTINE_COLUMNS, fsync_path
from app.refine.lsh import partition_of
from app.refine.profile import empty_profile, merge_profiles, profile_block

WORK_DROP = ["_norm", "error", "error_detail", "raw", "raw_bytes"]


class _Writers:
    """Parquet files written block by block (memory: one block), fsync'd and renamed into place on close."""

    def __init__(self) -> None:
        self.open: dict[str, tuple[pq.ParquetWriter, str]] = {}

    def write(self, path: str, table: pa.Table) -> None:
        if path not in self.open:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # hidden (pyarrow's dataset readers skip it): a writer killed mid-file leaves nothing a reader sees
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
            self.open[path] = (pq.ParquetWriter(tmp, table.schema, compression="zstd"), tmp)
        self.open[path][0].write_table(table)

    def close(self) -> None:
        for path, (writer, tmp) in self.open.items():
            writer.close()
            fsync_path(tmp)  # on this node, where its dirty pages are: the driver may run on another
            os.replace(tmp, path)
        self.open.clear()


def _merge(into: dict, part: dict) -> None:
    for src, counts in part.items():
        dst = into.setdefault(src, {})
        for k, v in counts.items():
            if isinstance(v, dict):
                sub = dst.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
            else:
                dst[k] = dst.get(k, 0) + v


def merge_counts(parts: Iterable[dict]) -> dict:
    out: dict = {}
    for p in parts:
        _merge(out, p)
    return out


class WorkSink(Datasink):
    """``prefix`` starts every file name (the resumable unit the files belong to: ``app.refine.resume``)."""

    def __init__(self, work_docs: str, quarantine_dir: str, num_partitions: int, prefix: str = ""):
        self.work_docs = work_docs
        self.quarantine_dir = quarantine_dir
        self.k = num_partitions
        self.prefix = prefix
        self.counts: dict = {}

    def write(self, blocks, ctx) -> dict:
        counts: dict = defaultdict(lambda: {"records": 0, "quarantined": 0, "quarantine_reasons": Counter()})
        out = _Writers()
        name = f"{self.prefix}{ctx.task_idx:06d}.parquet"
        for block in blocks:
            if block.num_rows == 0:
                continue
            for src, n in Counter(block.column("source").to_pylist()).items():
                counts[src]["records"] += n
            is_bad = pc.is_valid(block.column("error"))
            bad_rows = block.filter(is_bad)
            if bad_rows.num_rows:
                out.write(os.path.join(self.quarantine_dir, name), bad_rows.select(QUARANTINE_COLUMNS))
                for src, err in zip(bad_rows.column("source").to_pylist(), bad_rows.column("error").to_pylist()):
                    counts[src]["quarantined"] += 1
                    counts[src]["quarantine_reasons"][err] += 1
            good = block.filter(pc.invert(is_bad)).drop_columns([c for c in WORK_DROP if c in block.column_names])
            if good.num_rows:
                parts = partition_of(good.column("id").to_pylist(), self.k)
                for p in sorted(set(parts.tolist())):
                    out.write(os.path.join(self.work_docs, f"p={p}", name), good.filter(pa.array(parts == p)))
        out.close()
        return {src: {**c, "quarantine_reasons": dict(c["quarantine_reasons"])} for src, c in counts.items()}

    def on_write_complete(self, write_result) -> None:
        self.counts = merge_counts(write_result.write_returns)


class FilesSink(Datasink):
    """Blocks -> ``<dir>/part-<task>.parquet`` (the edges of pass 2: files, so pass 3 never depends on blocks
    held by a node that may be lost)."""

    def __init__(self, out: str):
        self.out = out

    def write(self, blocks, ctx) -> None:
        out = _Writers()
        for block in blocks:
            if block.num_rows:
                out.write(os.path.join(self.out, f"part-{ctx.task_idx:06d}.parquet"), block)
        out.close()


class OutputSink(Datasink):
    def __init__(self, out_dir: str, *, max_toxicity: float | None = None, lookup_ids=(), samples: int = 3):
        self.out_dir = out_dir
        self.max_toxicity = max_toxicity
        self.lookup_ids = frozenset(lookup_ids)
        self.k = samples
        self.counts: dict = {}
        self.profile: dict = empty_profile()

    def write(self, blocks, ctx) -> dict:
        counts: dict = defaultdict(lambda: {"docs": 0, "kept": 0, "dropped": 0, "exact_duplicates": 0,
                                            "near_duplicates": 0, "drop_reasons": Counter()})
        out = _Writers()
        name = f"part-{ctx.task_idx:06d}.parquet"
        profiles = []
        for block in blocks:
            if block.num_rows == 0:
                continue
            profiles.append(profile_block(block, max_toxicity=self.max_toxicity, lookup_ids=self.lookup_ids, k=self.k))
            is_drop = pc.is_valid(block.column("drop_reason"))
            for src, reason, reasons in zip(block.column("source").to_pylist(), block.column("drop_reason").to_pylist(),
                                            block.column("drop_reasons").to_pylist()):
                c = counts[src]
                c["docs"] += 1
                if reason is None:
                    c["kept"] += 1
                else:
                    c["dropped"] += 1
                    c["drop_reasons"][reason] += 1
                c["exact_duplicates"] += "exact_duplicate" in reasons
                c["near_duplicates"] += "near_duplicate" in reasons
            kept = block.filter(pc.invert(is_drop)).drop_columns(["drop_reason", "drop_reasons"])
            dropped = block.filter(is_drop)
            if kept.num_rows:
                out.write(os.path.join(self.out_dir, "kept", name), kept)
            if dropped.num_rows:
                out.write(os.path.join(self.out_dir, "dropped", name), dropped)
        out.close()
        return {"counts": {src: {**c, "drop_reasons": dict(c["drop_reasons"])} for src, c in counts.items()},
                "profile": merge_profiles(profiles, self.k)}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.counts = merge_counts(r["counts"] for r in returns)
        self.profile = merge_profiles((r["profile"] for r in returns), self.k)
