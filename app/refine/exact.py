"""Exact deduplication key: a 128-bit BLAKE2b of the normalized text (hex).

Grouping happens in ``lsh.bucket_rows`` / the pipeline's one Ray Data shuffle: every document emits
its exact key next to its LSH band keys, and a group of equal exact keys keeps its smallest id.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa


def exact_key(normalized: str) -> str:
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def exact_step(table: pa.Table) -> pa.Table:
    norm = table.column("_norm").to_pylist()
    keys = [None if n is None else exact_key(n) for n in norm]
    return table.append_column("exact_hash", pa.array(keys, type=pa.string()))
