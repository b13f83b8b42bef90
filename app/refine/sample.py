"""A sample corpus built at run time from real text on this machine.

The licence files and METADATA descriptions of the installed Python distributions: real prose with real
exact duplicates (identical licence texts shipped by many packages) and real near duplicates (the same
licence with another copyright line). Written as JSONL, JSONL.gz, JSONL.zst and Parquet shards, plus one
shard of malformed records built from the same text (truncated JSON, invalid UTF-8, missing or non-string
text, a non-object line) so quarantine has something to show.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from importlib import metadata

import pyarrow as pa
import pyarrow.parquet as pq

_LICENSE = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE|AUTHORS)[^/]*$", re.IGNORECASE)


def collect_texts(min_chars: int = 200, max_chars: int = 200_000) -> list[tuple[str, str]]:
    """(origin, text) for every licence file and METADATA description found, sorted by origin."""
    seen_paths: set[str] = set()
    out: list[tuple[str, str]] = []
    for dist in metadata.distributions():
        name = dist.metadata.get("Name", "unknown") if dist.metadata else "unknown"
        for f in dist.files or []:
            path = str(f)
            if not (_LICENSE.search(path) or path.endswith(".dist-info/METADATA")):
                continue
            try:
                full = str(f.locate())
            except Exception:  # noqa: BLE001 - odd distributions
                continue
            if full in seen_paths or not os.path.isfile(full):
                continue
            seen_paths.add(full)
            try:
                with open(full, encoding="utf-8") as fh:
                    text = fh.read(max_chars + 1)
            except (UnicodeDecodeError, OSError):
                continue
            if path.endswith("METADATA"):  # the long description follows the first blank line
                text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
            if min_chars <= len(text) <= max_chars:
                out.append((f"{name}:{path}", text))
    out.sort()
    return out


def _bad_records(texts: list[str]) -> list[bytes]:
    t = texts[0] if texts else "some text"
    good = json.dumps({"text": t}).encode()
    return [
        good[: len(good) // 2],                                   # truncated JSON
        b'{"text": "' + " ".join(t[:80].split()).encode() + b'\xff\xfe broken"}',     # invalid UTF-8
        json.dumps({"body": t[:200]}).encode(),                   # no text field
        json.dumps({"text": len(t)}).encode(),                    # text not a string
        json.dumps([t[:100]]).encode(),                           # not an object
    ]


def build_sample_corpus(out_dir: str, *, shards: int = 8, with_bad_records: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    items = collect_texts()
    buckets: list[list[dict]] = [[] for _ in range(shards)]
    for i, (origin, text) in enumerate(items):
        buckets[i % shards].append({"text": text, "origin": origin})
    for s, recs in enumerate(buckets):
        lines = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in recs)
        if s == 0:
            with gzip.open(os.path.join(out_dir, f"shard-{s:03d}.jsonl.gz"), "wb") as f:
                f.write(lines)
        elif s == 1:
            import zstandard

            with open(os.path.join(out_dir, f"shard-{s:03d}.jsonl.zst"), "wb") as f:
                f.write(zstandard.ZstdCompressor().compress(lines))
        elif s == 2:
            pq.write_table(pa.Table.from_pylist(recs), os.path.join(out_dir, f"shard-{s:03d}.parquet"))
        else:
            with open(os.path.join(out_dir, f"shard-{s:03d}.jsonl"), "wb") as f:
                f.write(lines)
    n_bad = 0
    if with_bad_records:
        bad = _bad_records([t for _, t in items])
        good = [json.dumps({"text": t, "origin": o}).encode() for o, t in items[:5]]
        with open(os.path.join(out_dir, f"shard-{shards:03d}-mixed.jsonl"), "wb") as f:
            for line in [good[0], *bad[:3], *good[1:], *bad[3:]]:
                f.write(line + b"\n")
        n_bad = len(bad)
    return {"documents": len(items) + (len(items[:5]) if with_bad_records else 0), "bad_records": n_bad,
            "files_read": len(items), "shards": shards + (1 if with_bad_records else 0)}
