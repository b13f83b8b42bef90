"""What the data-quality dashboard needs beyond counts, gathered while the decided documents are written.

Per written block (``profile_block``, merged by ``merge_profiles``):
    per source   documents scored for toxicity and how many are over ``decide.max_toxicity``
    histograms   log10(perplexity) and toxicity, kept vs dropped, on fixed edges (mergeable)
    samples      the first ``k`` documents per drop reason (text cut to ``SAMPLE_CHARS``)
    lookup       the documents whose ids were asked for: duplicates picked from ``duplicates/`` before the
                 pass and the documents they matched, so the page can show a duplicate beside its match

All of it lands in report.json, which is all the page reads.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PPL_LOG10_EDGES = np.round(np.linspace(0.0, 5.0, 101), 6)  # perplexity 1 .. 100,000; outside: the end bins
TOX_EDGES = np.round(np.linspace(0.0, 1.0, 51), 6)
SAMPLE_CHARS = 1000
SAMPLE_FIELDS = ["id", "source", "text", "drop_reason", "drop_reasons", "perplexity", "toxicity", "quality_score",
                 "duplicate_of", "near_similarity"]


def _hist(values: np.ndarray, edges: np.ndarray) -> list[int]:
    v = np.clip(values[~np.isnan(values)], edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(np.int64).tolist()


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


def _row(rec: dict) -> dict:
    out = {f: rec.get(f) for f in SAMPLE_FIELDS}
    if out["text"] is not None and len(out["text"]) > SAMPLE_CHARS:
        out["text"] = out["text"][:SAMPLE_CHARS] + " …"
    return out


def empty_profile() -> dict:
    zero = lambda edges: [0] * (len(edges) - 1)  # noqa: E731
    return {"sources": {}, "samples": {}, "lookup": {},
            "hist": {"perplexity": {"kept": zero(PPL_LOG10_EDGES), "dropped": zero(PPL_LOG10_EDGES)},
                     "toxicity": {"kept": zero(TOX_EDGES), "dropped": zero(TOX_EDGES)}}}


def profile_block(block: pa.Table, *, max_toxicity: Optional[float], lookup_ids: frozenset, k: int) -> dict:
    prof = empty_profile()
    dropped = pc.is_valid(block.column("drop_reason")).to_numpy(zero_copy_only=False)
    ppl, tox = _floats(block, "perplexity"), _floats(block, "toxicity")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ppl = np.log10(ppl)
    for name, values, edges in (("perplexity", log_ppl, PPL_LOG10_EDGES), ("toxicity", tox, TOX_EDGES)):
        prof["hist"][name]["kept"] = _hist(values[~dropped], edges)
        prof["hist"][name]["dropped"] = _hist(values[dropped], edges)
    sources = block.column("source").to_pylist()
    scored = ~np.isnan(tox)
    over = scored & (tox > max_toxicity) if max_toxicity is not None else np.zeros(len(tox), dtype=bool)
    for i in np.flatnonzero(scored):
        s = prof["sources"].setdefault(sources[i], {"toxicity_scored": 0, "toxicity_over": 0})
        s["toxicity_scored"] += 1
        s["toxicity_over"] += int(over[i])
    reasons = block.column("drop_reason").to_pylist()
    ids = block.column("id").to_pylist()
    want = [i for i, r in enumerate(reasons) if r is not None]
    wanted_ids = [i for i, d in enumerate(ids) if d in lookup_ids]
    taken: dict[str, int] = {}
    picks = []
    for i in want:
        if taken.get(reasons[i], 0) < k:
            taken[reasons[i]] = taken.get(reasons[i], 0) + 1
            picks.append(i)
    if picks or wanted_ids:
        cols = [c for c in SAMPLE_FIELDS if c in block.column_names]
        for i in sorted(set(picks) | set(wanted_ids)):
            rec = _row(block.slice(i, 1).select(cols).to_pylist()[0])
            if i in picks:
                prof["samples"].setdefault(rec["drop_reason"], []).append(rec)
            if ids[i] in lookup_ids:
                prof["lookup"][ids[i]] = rec
    return prof


def merge_profiles(parts, k: int) -> dict:
    out = empty_profile()
    for p in parts:
        for src, c in p["sources"].items():
            d = out["sources"].setdefault(src, {"toxicity_scored": 0, "toxicity_over": 0})
            for key, v in c.items():
                d[key] += v
        for name, h in p["hist"].items():
            for side in ("kept", "dropped"):
                out["hist"][name][side] = [a + b for a, b in zip(out["hist"][name][side], h[side])]
        for reason, rows in p["samples"].items():
            have = out["samples"].setdefault(reason, [])
            have.extend(rows[: max(0, k - len(have))])
        out["lookup"].update(p["lookup"])
    return out


def pick_duplicates(duplicates_dir: str, k: int, max_files: int = 8) -> list[dict]:
    """Up to k exact and k near duplicates (not representatives) from the first ``max_files`` files of
    ``duplicates/`` (bounded work however large the corpus; a kind absent there gets no sample)."""
    files = sorted(os.path.join(duplicates_dir, f) for f in os.listdir(duplicates_dir)
                   if f.endswith(".parquet")) if os.path.isdir(duplicates_dir) else []
    picked: dict[str, list[dict]] = {"exact": [], "near": []}
    for f in files[:max_files]:
        for rec in pq.read_table(f, columns=["id", "duplicate_of", "kind", "similarity"]).to_pylist():
            bucket = picked.get(rec["kind"])
            if bucket is not None and len(bucket) < k and rec["duplicate_of"] is not None:
                bucket.append(rec)
        if all(len(v) >= k for v in picked.values()):
            break
    return picked["exact"] + picked["near"]


def duplicate_samples(picks: list[dict], lookup: dict) -> dict:
    """Samples for the duplicate reasons: each picked duplicate with the document it matched (``duplicate_of``)."""
    out: dict[str, list[dict]] = {}
    for p in picks:
        doc = lookup.get(p["id"])
        if doc is None:
            continue
        match = lookup.get(p["duplicate_of"])
        reason = "exact_duplicate" if p["kind"] == "exact" else "near_duplicate"
        out.setdefault(reason, []).append({**doc, "similarity": p["similarity"], "matched": None if match is None else {
            "id": match["id"], "source": match["source"], "text": match["text"], "drop_reason": match["drop_reason"]}})
    return out
