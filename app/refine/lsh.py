"""LSH banding, bucket grouping, candidate edges and their exact verification.

Flow (see ``pipeline.py``):
    minhash_step      adds ``bands`` (list<uint64>, one key per band) next to ``exact_hash``
    bucket_rows       one row per (document, key): the exact key ``e<hash>`` and the band keys ``b<i>:<key>``;
                      with exact dedup off and near dedup on, the copies key ``c<hash>`` instead of ``e<hash>``
    bucket_edges      run per bucket inside the Ray Data ``groupby(key).map_groups`` shuffle:
                        exact bucket -> star edges smallest id -> every other id (kind "exact")
                        copies bucket -> the same star, as near candidates (kind "near"): band buckets keep one
                                        document per exact hash, so without it the other copies of a text would
                                        have no edge and be kept when exact dedup is off
                        band bucket  -> members reduced to one per exact hash (the exact representative),
                                        sorted by id; with at most ``all_pairs_max`` of them every pair (a
                                        bucket of licence variants holds texts similar to some members and
                                        not to others, and a star + chain can pass a similar pair by);
                                        bigger buckets (boilerplate clusters): star edges from the smallest +
                                        chain edges between neighbours (kind "near"), so one dissimilar anchor
                                        that collided by chance does not cut similar members apart, with
                                        edges linear in the bucket
    verify            exact Jaccard of a candidate pair's shingle sets (``minhash.shingles``)

The banding (bands x rows) comes from ``banding.choose_banding``.

Ids are compared as strings everywhere ("smallest id" = lexicographically smallest).
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pyarrow as pa

from app.refine.minhash import band_hashes, minhash_signatures

EDGE_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("kind", pa.string())])


def partition_of(ids: list[str], num_partitions: int) -> np.ndarray:
    """Stable hash partition of each id (the same function everywhere the graph is partitioned)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little") % num_partitions for i in ids),
        dtype=np.int64,
        count=len(ids),
    )


def minhash_step(table: pa.Table, *, num_perm: int, ngram: int, seed: int, bands: int, rows: int) -> pa.Table:
    """Adds ``bands``: one 64-bit key per LSH band (null for quarantined rows)."""
    texts = table.column("text").to_pylist()
    idx = [i for i, t in enumerate(texts) if t is not None]
    out: list = [None] * len(texts)
    if idx:
        sig = minhash_signatures([texts[i] for i in idx], num_perm=num_perm, ngram=ngram, seed=seed)
        keys = band_hashes(sig, bands, rows)
        for j, i in enumerate(idx):
            out[i] = keys[j].tolist()
    return table.append_column("bands", pa.array(out, type=pa.list_(pa.uint64())))


def bucket_rows(batch: pa.Table, *, exact: bool, near: bool) -> pa.Table:
    """(key, id, exact_hash) rows: one exact (or copies) key and one key per band for every document."""
    ids = batch.column("id").to_pylist()
    hashes = batch.column("exact_hash").to_pylist()
    bands = batch.column("bands").to_pylist() if near else None
    keys, out_ids, out_hash = [], [], []
    copies = "e" if exact else "c"  # exact off: the copies of a text are still near duplicates (Jaccard 1)
    for j, (id_, h) in enumerate(zip(ids, hashes)):
        if exact or near:
            keys.append(copies + h)
            out_ids.append(id_)
            out_hash.append(h)
        if near:
            for b, k in enumerate(bands[j]):
                keys.append(f"b{b}:{k:016x}")
                out_ids.append(id_)
                out_hash.append(h)
    return pa.table({"key": pa.array(keys, pa.string()), "id": pa.array(out_ids, pa.string()),
                     "exact_hash": pa.array(out_hash, pa.string())})


ALL_PAIRS_MAX = 64
"""Band buckets with at most this many distinct texts get every pair as a candidate (at most 2,016)."""


def bucket_edges(group: pa.Table, all_pairs_max: int = ALL_PAIRS_MAX) -> pa.Table:
    """Edges of one bucket (all rows share ``key``); singletons give none."""
    if group.num_rows < 2:
        return EDGE_SCHEMA.empty_table()
    key = group.column("key")[0].as_py()
    ids = group.column("id").to_pylist()
    if key[0] in "ec":
        members = sorted(set(ids))
        kind = "exact" if key[0] == "e" else "near"
        a = [members[0]] * (len(members) - 1)
        b = members[1:]
    else:
        best: dict[str, str] = {}
        for id_, h in zip(ids, group.column("exact_hash").to_pylist()):
            if h not in best or id_ < best[h]:
                best[h] = id_
        members = sorted(best.values())
        kind = "near"
        if len(members) <= all_pairs_max:
            pairs_sorted = list(itertools.combinations(members, 2))  # sorted members: sorted pairs, a < b
        else:
            pairs_sorted = sorted({(members[0], m) for m in members[1:]} | set(zip(members[:-1], members[1:])))
        a = [p[0] for p in pairs_sorted]
        b = [p[1] for p in pairs_sorted]
    return pa.table({"a": pa.array(a, pa.string()), "b": pa.array(b, pa.string()),
                     "kind": pa.array([kind] * len(a), pa.string())}, schema=EDGE_SCHEMA)
