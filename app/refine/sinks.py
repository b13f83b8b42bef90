"""Ray Data sinks that split one stream into several outputs and return per-shard counts.

``WorkSink``   parsed + scored records -> ``_work/docs/p=<part>/`` (hash-partitioned by id) and
               malformed records -> ``quarantine/``; returns per-source record/quarantine counts.
``OutputSink`` decided records -> ``kept/`` and ``dropped/``; returns per-source keep/drop counts.
File names derive from the write task index, so a retried task rewrites its own files.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

from app.refine.io import QUARANTINE_COLUMNS, write_table
from app.refine.lsh import partition_of

WORK_DROP = ["_norm", "error", "error_detail", "raw", "raw_bytes"]


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
    def __init__(self, work_docs: str, quarantine_dir: str, num_partitions: int):
        self.work_docs = work_docs
        self.quarantine_dir = quarantine_dir
        self.k = num_partitions
        self.counts: dict = {}

    def write(self, blocks, ctx) -> dict:
        counts: dict = defaultdict(lambda: {"records": 0, "quarantined": 0, "quarantine_reasons": Counter()})
        good_parts: list[list[pa.Table]] = [[] for _ in range(self.k)]
        bad: list[pa.Table] = []
        for block in blocks:
            if block.num_rows == 0:
                continue
            for src, n in Counter(block.column("source").to_pylist()).items():
                counts[src]["records"] += n
            is_bad = pc.is_valid(block.column("error"))
            bad_rows = block.filter(is_bad)
            if bad_rows.num_rows:
                bad.append(bad_rows.select(QUARANTINE_COLUMNS))
                for src, err in zip(bad_rows.column("source").to_pylist(), bad_rows.column("error").to_pylist()):
                    counts[src]["quarantined"] += 1
                    counts[src]["quarantine_reasons"][err] += 1
            good = block.filter(pc.invert(is_bad)).drop_columns([c for c in WORK_DROP if c in block.column_names])
            if good.num_rows:
                parts = partition_of(good.column("id").to_pylist(), self.k)
                for p in set(parts.tolist()):
                    good_parts[p].append(good.filter(pa.array(parts == p)))
        name = f"{ctx.task_idx:06d}.parquet"
        for p, tables in enumerate(good_parts):
            if tables:
                write_table(pa.concat_tables(tables), os.path.join(self.work_docs, f"p={p}", name))
        if bad:
            write_table(pa.concat_tables(bad), os.path.join(self.quarantine_dir, f"part-{name}"))
        return {src: {**c, "quarantine_reasons": dict(c["quarantine_reasons"])} for src, c in counts.items()}

    def on_write_complete(self, write_result) -> None:
        self.counts = merge_counts(write_result.write_returns)


class OutputSink(Datasink):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.counts: dict = {}

    def write(self, blocks, ctx) -> dict:
        counts: dict = defaultdict(lambda: {"docs": 0, "kept": 0, "dropped": 0, "exact_duplicates": 0,
                                            "near_duplicates": 0, "drop_reasons": Counter()})
        kept, dropped = [], []
        for block in blocks:
            if block.num_rows == 0:
                continue
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
            kept.append(block.filter(pc.invert(is_drop)).drop_columns(["drop_reason", "drop_reasons"]))
            dropped.append(block.filter(is_drop))
        name = f"part-{ctx.task_idx:06d}.parquet"
        k = pa.concat_tables(kept) if kept else None
        d = pa.concat_tables(dropped) if dropped else None
        if k is not None and k.num_rows:
            write_table(k, os.path.join(self.out_dir, "kept", name))
        if d is not None and d.num_rows:
            write_table(d, os.path.join(self.out_dir, "dropped", name))
        return {src: {**c, "drop_reasons": dict(c["drop_reasons"])} for src, c in counts.items()}

    def on_write_complete(self, write_result) -> None:
        self.counts = merge_counts(write_result.write_returns)
