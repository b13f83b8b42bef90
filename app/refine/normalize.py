"""Normalization used for hashing: NFKC and whitespace. The output text stays the original."""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, every whitespace run collapsed to one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def normalize_step(table: pa.Table) -> pa.Table:
    """Adds the transient ``_norm`` column (dropped before anything is written)."""
    texts = table.column("text").to_pylist()
    norm = [None if t is None else normalize(t) for t in texts]
    return table.append_column("_norm", pa.array(norm, type=pa.string()))
