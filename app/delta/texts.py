"""The transfer's texts: plain-text files cut into documents, role columns, and the default general text split
by near-duplicate family.

    text_documents    a plain-text file's text -> documents: blank-line paragraphs, a paragraph longer than
                      ``max_bytes`` cut at line ends, then spaces, then anywhere (on character boundaries). The
                      held-out split hashes whole documents, so one ``.txt`` of a domain must be many of them.
    RoleRows          Ray Data batch function: rows of the refine reader -> ``id, text, error, role``, plain-text
                      rows cut by ``text_documents`` (ids ``<file id>#<k>``)
    near_families     family (connected component of near-duplicate links) per text: MinHash/LSH candidates from
                      the refine job's library (``app.refine.minhash``, ``app.refine.banding``), verified against
                      exact Jaccard, components by scipy
    default_general   the general text found on this machine (licence files, package descriptions), split into
                      retain-training and held-out by family, so near-identical licences never land on both sides;
                      keyed by its content (the cache key changes when the machine's text does)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import NamedTuple, Optional

import numpy as np

log = logging.getLogger(__name__)

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _cut(piece: str, max_bytes: int) -> list[str]:
    """``piece`` in parts of at most ``max_bytes`` UTF-8 bytes, cut after the last newline, else the last space,
    else before the last character that fits (a character longer than ``max_bytes`` is a part of its own)."""
    raw = piece.encode("utf-8")
    out, pos = [], 0
    while len(raw) - pos > max_bytes:
        end = pos + max_bytes
        cut = raw.rfind(b"\n", pos + 1, end)
        if cut < 0:
            cut = raw.rfind(b" ", pos + 1, end)
        if cut >= 0:
            end = cut + 1
        else:
            while end > pos and raw[end] & 0xC0 == 0x80:  # not inside a character
                end -= 1
            if end == pos:  # one character wider than max_bytes
                end = pos + 1
                while end < len(raw) and raw[end] & 0xC0 == 0x80:
                    end += 1
        out.append(raw[pos:end].decode("utf-8"))
        pos = end
    if pos < len(raw):
        out.append(raw[pos:].decode("utf-8"))
    return out


def text_documents(text: str, max_bytes: int) -> list[str]:
    """Documents of a plain-text file: its blank-line paragraphs (whitespace-only ones dropped), each at most
    ``max_bytes`` UTF-8 bytes (longer ones cut at line ends, then spaces). Every non-blank byte of ``text`` is in
    exactly one document, in order."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    docs = []
    for para in _BLANK_LINE.split(text):
        if para.strip():
            docs.extend(p for p in _cut(para, max_bytes) if p.strip())
    return docs


class RoleRows:
    """Ray Data batch function (pyarrow): the refine reader's rows -> ``id, text, error, role``; a row read from a
    plain-text file (``source`` .txt/.md/.rst/.text) becomes one row per ``text_documents`` document."""

    def __init__(self, role: str, doc_bytes: int):
        self.role, self.doc_bytes = role, doc_bytes

    def __call__(self, table):
        import pyarrow as pa

        from app.refine.io import TEXT_EXT

        ids, texts, errors = (table.column(c).to_pylist() for c in ("id", "text", "error"))
        sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * len(ids)
        out_id, out_text, out_err = [], [], []
        for id_, text, err, src in zip(ids, texts, errors, sources):
            if err is None and isinstance(text, str) and src and src.lower().endswith(TEXT_EXT):
                docs = text_documents(text, self.doc_bytes)
                out_id += [f"{id_}#{k}" for k in range(len(docs))]
                out_text += docs
                out_err += [None] * len(docs)
            else:
                out_id.append(id_)
                out_text.append(text)
                out_err.append(err)
        return pa.table({"id": pa.array(out_id, pa.string()), "text": pa.array(out_text, pa.string()),
                         "error": pa.array(out_err, pa.string()), "role": pa.array([self.role] * len(out_id), pa.string())})


def near_families(texts: list[str], *, threshold: Optional[float] = None) -> np.ndarray:
    """Family label per text (the smallest index in its connected component of near-duplicate links, Jaccard of
    word-shingle sets >= ``threshold``; default: the refine job's ``dedup.near`` settings)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from app.config import NearDedupConfig
    from app.refine.banding import choose_banding
    from app.refine.minhash import band_hashes, jaccard, minhash_signatures, shingles

    n = len(texts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    cfg = NearDedupConfig() if threshold is None else NearDedupConfig(threshold=threshold)
    banding = choose_banding(cfg.threshold, cfg.num_perm, cfg.min_recall)
    keys = band_hashes(minhash_signatures(texts, num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed),
                       banding.bands, banding.rows)  # (N, bands)
    candidates: set[tuple[int, int]] = set()
    for b in range(keys.shape[1]):
        buckets: dict[int, list[int]] = {}
        for i, k in enumerate(keys[:, b].tolist()):
            buckets.setdefault(k, []).append(i)
        for members in buckets.values():
            candidates.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
    sets: dict[int, set] = {}
    edges = [(i, j) for i, j in sorted(candidates)
             if jaccard(sets.setdefault(i, shingles(texts[i], cfg.ngram)),
                        sets.setdefault(j, shingles(texts[j], cfg.ngram))) >= cfg.threshold]
    rows = np.array([e[0] for e in edges], dtype=np.int64)
    cols = np.array([e[1] for e in edges], dtype=np.int64)
    _, comp = connected_components(coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n)), directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]


class GeneralText(NamedTuple):
    """The default general text, written as JSONL: ``retain`` (the retain term), ``held_out`` (the damage
    measure), ``key`` (a hash of both files' content), ``families`` (how many near-duplicate families)."""

    retain: str
    held_out: str
    key: str
    families: int


def default_general(out_dir: str, fraction: float, *, limit: int = 400) -> GeneralText:
    """General text on this machine (``app.refine.sample.collect_texts``, the first ``limit``), split into
    retain-training and held-out by near-duplicate family: a family is held out when the hash of its first
    text says so (``spanscore.heldout``), so every member lands on the same side."""
    from app.delta.spanscore import heldout
    from app.refine.sample import collect_texts

    texts = [t for _, t in collect_texts()[:limit]]
    fam = near_families(texts)
    held = [heldout(texts[f], fraction) for f in fam]
    paths = {"retain": os.path.join(out_dir, "retain_default.jsonl"),
             "held_out": os.path.join(out_dir, "general_heldout_default.jsonl")}
    digest = hashlib.sha256()
    for name, side in (("retain", False), ("held_out", True)):
        lines = [json.dumps({"id": f"general-{i}", "text": t}) + "\n" for i, t in enumerate(texts) if held[i] == side]
        with open(paths[name], "w") as f:
            f.writelines(lines)
        digest.update(f"{name}\x00{''.join(lines)}\x00".encode())
    n_fam = len(set(fam.tolist()))
    log.info("default general text: %d texts in %d near-duplicate families, %d held out", len(texts), n_fam, sum(held))
    return GeneralText(retain=os.path.abspath(paths["retain"]), held_out=os.path.abspath(paths["held_out"]),
                       key=digest.hexdigest(), families=n_fam)
