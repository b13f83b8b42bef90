"""The dedup graph on Ray core tasks: candidate verification, connected components, cluster labels.

Everything here is hash-partitioned by document id into ``K = dedup.num_partitions`` parts
(``lsh.partition_of``); the work files ``_work/docs/p=<k>/`` hold the documents of part k, so a task
that needs texts reads only its own part. No step collects all edges or all labels on one node:
each task holds one part (1/K of the edges it works on).

Connected components: alternating Large-Star / Small-Star (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014), which converges in O(log n) rounds. One round is two hash
shuffles of the edge list done with plain Ray tasks (``num_returns=K``) - a Ray Data groupby costs
7-9 s of fixed overhead per shuffle on a 2-CPU machine, so the few rounds use tasks instead.
Written by hand: no library in the dependency set offers distributed connected components.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from app.refine.io import parquet_files, write_table
from app.refine.lsh import partition_of
from app.refine.minhash import jaccard, shingles

log = logging.getLogger(__name__)

DUP_SCHEMA = pa.schema([("id", pa.string()), ("cluster_id", pa.string()), ("representative_id", pa.string()),
                        ("kind", pa.string()), ("similarity", pa.float64())])
LABEL_SCHEMA = pa.schema([("id", pa.string()), ("exact_of", pa.string()), ("near_of", pa.string()),
                          ("near_similarity", pa.float64())])


# ------------------------------------------------------------------------------------------ reference


def connected_components_ref(edges, nodes=()) -> dict:
    """The slow, obvious reference: union-find on one machine. node -> smallest id of its component."""
    parent: dict = {n: n for n in nodes}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {n: find(n) for n in list(parent)}


def pairs_in_components(edges, nodes=()) -> set:
    """All (a, b), a < b, that share a component: the pairwise view used for precision and recall."""
    import itertools

    groups: dict = {}
    for n, root in connected_components_ref(edges, nodes).items():
        groups.setdefault(root, []).append(n)
    return {p for g in groups.values() for p in itertools.combinations(sorted(g), 2)}


# ------------------------------------------------------------------------------------------ helpers


def _concat(pieces) -> pd.DataFrame:
    frames = [p.to_pandas() if isinstance(p, pa.Table) else p for p in pieces]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _split_df(df: pd.DataFrame, col: str, k: int, columns: list[str]) -> list[pd.DataFrame]:
    if not len(df):
        empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
        return [empty] * k
    parts = partition_of(df[col].tolist(), k)
    return [df[parts == i].reset_index(drop=True) for i in range(k)]


def _ret(parts: list):
    return parts[0] if len(parts) == 1 else tuple(parts)


def _as_lists(refs, k: int) -> list[list]:
    """Map-task outputs (one ref, or k refs each) -> per-part lists of refs."""
    out: list[list] = [[] for _ in range(k)]
    for r in refs:
        r = [r] if k == 1 else r
        for i in range(k):
            out[i].append(r[i])
    return out


def _read_texts(files: list[str], ids) -> dict[str, str]:
    ids = list(set(ids))
    if not ids or not files:
        return {}
    table = pq.read_table(files, columns=["id", "text"], filters=[("id", "in", ids)])
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))


# ------------------------------------------------------------------------------------------ tasks


@ray.remote
def _split_edges(path: str, k: int):
    """One file of candidate edges -> near edges by part(a); exact edges as duplicate rows by part(id)."""
    df = pq.read_table(path).to_pandas()
    near = df[df["kind"] == "near"][["a", "b"]]
    ex = df[df["kind"] == "exact"]
    rows = pd.concat([
        pd.DataFrame({"id": ex["b"], "representative_id": ex["a"]}),
        pd.DataFrame({"id": ex["a"], "representative_id": ex["a"]}),
    ], ignore_index=True)
    return tuple(_split_df(near, "a", k, ["a", "b"]) + _split_df(rows, "id", k, ["id", "representative_id"]))


@ray.remote
def _attach_first(files: list[str], k: int, *pieces):
    """Pairs (a, b) whose a is in this part -> (a, b, text_a), split by part(b)."""
    df = _concat(pieces)
    if not len(df):
        return _ret(_split_df(df, "b", k, ["a", "b", "text_a"]))
    df = df.drop_duplicates(["a", "b"])
    texts = _read_texts(files, df["a"])
    df = df.assign(text_a=df["a"].map(texts))
    missing = df["text_a"].isna()
    if missing.any():
        raise RuntimeError(f"{int(missing.sum())} graph ids have no document in {files[:1]}...")
    return _ret(_split_df(df, "b", k, ["a", "b", "text_a"]))


@ray.remote
def _attach_second(files: list[str], ngram: int, min_sim: Optional[float], *pieces) -> pd.DataFrame:
    """(a, b, text_a) with b in this part -> (a, b, similarity), keeping pairs with similarity >= min_sim."""
    df = _concat(pieces)
    if not len(df):
        return pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object),
                             "similarity": pd.Series([], dtype=float)})
    texts = _read_texts(files, df["b"])
    cache: dict[str, set] = {}

    def sh(key: str, text: str) -> set:
        if key not in cache:
            cache[key] = shingles(text, ngram)
        return cache[key]

    sims = [jaccard(sh(a, ta), sh(b, texts[b])) for a, b, ta in zip(df["a"], df["b"], df["text_a"])]
    out = pd.DataFrame({"a": df["a"].values, "b": df["b"].values, "similarity": np.asarray(sims, dtype=float)})
    if min_sim is not None:
        out = out[out["similarity"] >= min_sim - 1e-12].reset_index(drop=True)
    return out


@ray.remote
def _both_directions(df: pd.DataFrame, k: int):
    """Undirected edges (a, b) -> directed (u, v) both ways, split by part(u)."""
    d = pd.DataFrame({"u": np.concatenate([df["a"].values, df["b"].values]),
                      "v": np.concatenate([df["b"].values, df["a"].values])}) if len(df) else pd.DataFrame(columns=["u", "v"])
    return _ret(_split_df(d, "u", k, ["u", "v"]))


@ray.remote
def _smaller_direction(df: pd.DataFrame, k: int):
    """Undirected edges -> (u, v) with v < u, split by part(u)."""
    if len(df):
        a, b = df["a"].values, df["b"].values
        lt = b < a
        d = pd.DataFrame({"u": np.where(lt, a, b), "v": np.where(lt, b, a)})
    else:
        d = pd.DataFrame(columns=["u", "v"])
    return _ret(_split_df(d, "u", k, ["u", "v"]))


def _edges_out(a, b) -> pd.DataFrame:
    """Deduplicated undirected edges (a < b), self-loops dropped."""
    a = np.asarray(a, dtype=object)
    b = np.asarray(b, dtype=object)
    if not len(a):
        return pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object)})
    lt = a < b
    df = pd.DataFrame({"a": np.where(lt, a, b), "b": np.where(lt, b, a)})
    return df[df["a"] != df["b"]].drop_duplicates().reset_index(drop=True)


@ray.remote(num_returns=2)
def _large_star(*pieces):
    """For each u: m = min(N(u) + u); connect every larger neighbour v > u to m.

    Changes the graph iff some u has both a larger and a smaller neighbour.
    """
    d = _concat(pieces)
    if not len(d):
        return _edges_out([], []), False
    m = d.groupby("u")["v"].min()
    mu = np.minimum(d["u"].map(m).values.astype(object), d["u"].values)
    keep = d["v"].values > d["u"].values
    changed = bool((mu[keep] != d["u"].values[keep]).any())
    return _edges_out(d["v"].values[keep], mu[keep]), changed


@ray.remote(num_returns=2)
def _small_star(*pieces):
    """For each u with smaller neighbours N: m = min(N); connect N + u to m.

    Changes the graph iff some u has two or more distinct smaller neighbours.
    """
    d = _concat(pieces)
    if not len(d):
        return _edges_out([], []), False
    m = d.groupby("u")["v"].min()
    changed = bool((d.groupby("u")["v"].nunique() > 1).any())
    nodes = np.concatenate([d["v"].values, m.index.values])
    roots = np.concatenate([d["u"].map(m).values, m.values])
    return _edges_out(nodes, roots), changed


@ray.remote
def _roots(k: int, *pieces):
    """Converged star edges -> (node, root) rows, split by part(node); roots label themselves."""
    d = _concat(pieces)
    if not len(d):
        return _ret(_split_df(pd.DataFrame(), "node", k, ["node", "root"]))
    rows = pd.concat([pd.DataFrame({"node": d["b"], "root": d["a"]}),
                      pd.DataFrame({"node": d["a"], "root": d["a"]})], ignore_index=True)
    rows = rows.groupby("node", as_index=False)["root"].min()
    return _ret(_split_df(rows, "node", k, ["node", "root"]))


@ray.remote
def _root_pairs(k: int, *pieces):
    """(node, root) rows -> pairs (a=root, b=node) for non-roots, split by part(root)."""
    d = _concat(pieces)
    if len(d):
        d = d[d["node"] != d["root"]].drop_duplicates("node")
        d = pd.DataFrame({"a": d["root"].values, "b": d["node"].values})
    return _ret(_split_df(d, "a", k, ["a", "b"]))


@ray.remote
def _finalize(out_path: str, labels_path: str, exact_pieces: list, root_pieces: list, sim_pieces: list) -> dict:
    """Write this part's ``duplicates/`` rows and its labels (one row per duplicate document); its statistics."""
    ex = _concat(ray.get(exact_pieces))
    roots = _concat(ray.get(root_pieces))
    if len(roots):  # a node's (node, root) row can come from several star partitions
        roots = roots.drop_duplicates("node")
    sims = _concat(ray.get(sim_pieces))
    frames = []
    if len(ex):
        ex = ex.drop_duplicates()
        frames.append(pd.DataFrame({"id": ex["id"], "cluster_id": "exact:" + ex["representative_id"],
                                    "representative_id": ex["representative_id"], "kind": "exact",
                                    "similarity": 1.0}))
    if len(roots):
        sim_of = dict(zip(sims["b"], sims["similarity"])) if len(sims) else {}
        sim = [1.0 if n == r else sim_of[n] for n, r in zip(roots["node"], roots["root"])]
        frames.append(pd.DataFrame({"id": roots["node"], "cluster_id": "near:" + roots["root"],
                                    "representative_id": roots["root"], "kind": "near", "similarity": sim}))
    dup = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in DUP_SCHEMA.names})
    dup = dup.sort_values(["cluster_id", "id"]).reset_index(drop=True)
    table = pa.Table.from_pandas(dup, schema=DUP_SCHEMA, preserve_index=False)
    if table.num_rows:
        write_table(table, out_path)
    non_rep = dup[dup["id"] != dup["representative_id"]]
    ex_of = non_rep[non_rep["kind"] == "exact"].set_index("id")["representative_id"]
    near = non_rep[non_rep["kind"] == "near"].set_index("id")
    ids = sorted(set(ex_of.index) | set(near.index))
    labels = pa.table({
        "id": pa.array(ids, pa.string()),
        "exact_of": pa.array([ex_of.get(i) for i in ids], pa.string()),
        "near_of": pa.array([near["representative_id"].get(i) for i in ids], pa.string()),
        "near_similarity": pa.array([near["similarity"].get(i) for i in ids], pa.float64()),
    }, schema=LABEL_SCHEMA)
    write_table(labels, labels_path)
    stats = {"exact_clusters": int((dup["kind"] == "exact").sum() - len(ex_of)) if len(dup) else 0,
             "near_clusters": int(((dup["kind"] == "near") & (dup["id"] == dup["representative_id"])).sum()) if len(dup) else 0,
             "duplicate_rows": int(len(dup))}
    return stats


# ------------------------------------------------------------------------------------------ driver


def connected_components(edges: list, k: int, max_rounds: int) -> tuple[list, int]:
    """Undirected edge DataFrames (refs, columns a, b) -> converged star edges per part, and rounds used.

    Converged when a whole round (large-star, then small-star) changes nothing: every component is then
    a star around its smallest id.
    """
    for rnd in range(1, max_rounds + 1):
        split = _as_lists([_both_directions.options(num_returns=k).remote(e, k) for e in edges], k)
        large = [_large_star.remote(*split[i]) for i in range(k)]
        split = _as_lists([_smaller_direction.options(num_returns=k).remote(e, k) for e, _ in large], k)
        small = [_small_star.remote(*split[i]) for i in range(k)]
        edges = [e for e, _ in small]
        changed = ray.get([c for _, c in large] + [c for _, c in small])
        log.info("connected components: round %d, changed=%s", rnd, any(changed))
        if not any(changed):
            return edges, rnd
    raise RuntimeError(f"connected components did not converge in dedup.max_cc_rounds={max_rounds} rounds")


def label_paths(labels_dir: str, k: int) -> list[str]:
    return [os.path.join(labels_dir, f"part-{i:05d}.parquet") for i in range(k)]


def dedup_graph(edge_files: list, *, work_docs: str, out_dir: str, labels_dir: str, k: int, ngram: int,
                threshold: float, verify: bool, max_rounds: int) -> dict:
    """Candidate/exact edge files (from pass 2) -> graph statistics.

    Writes ``out_dir/duplicates/part-<i>.parquet`` and the labels of part i to ``label_paths(labels_dir, k)[i]``.
    Every input is a file, so a task lost with its node is run again from files (or from the outputs of
    tasks Ray reconstructs by lineage).
    """
    t0 = time.time()
    files = [parquet_files(work_docs, [p]) for p in range(k)]
    split = [_split_edges.options(num_returns=2 * k).remote(f, k) for f in edge_files]
    near_by_a = [[s[i] for s in split] for i in range(k)]
    exact_by_id = [[s[k + i] for s in split] for i in range(k)]

    # Verification: exact Jaccard of every candidate pair (or just its similarity when verify is off).
    first = _as_lists([_attach_first.options(num_returns=k).remote(files[i], k, *near_by_a[i]) for i in range(k)], k)
    verified = [_attach_second.remote(files[i], ngram, threshold if verify else None, *first[i]) for i in range(k)]
    n_candidates = sum(ray.get([_count.remote(r) for part in first for r in part]))  # distinct pairs (a's part dedups)
    n_verified = sum(ray.get([_count.remote(v) for v in verified]))
    log.info("dedup graph: %d candidate pairs, %d verified near edges (%.1fs)", n_candidates, n_verified, time.time() - t0)
    t0 = time.time()

    stars, rounds = connected_components(verified, k, max_rounds) if n_verified else ([_empty_edges.remote() for _ in range(k)], 0)
    roots = _as_lists([_roots.options(num_returns=k).remote(k, s) for s in stars], k)
    pairs = _as_lists([_root_pairs.options(num_returns=k).remote(k, *roots[i])
                       for i in range(k)], k)
    first = _as_lists([_attach_first.options(num_returns=k).remote(files[i], k, *pairs[i]) for i in range(k)], k)
    sims = [_attach_second.remote(files[i], ngram, None, *first[i]) for i in range(k)]

    labels = label_paths(labels_dir, k)
    part_stats = ray.get([_finalize.remote(os.path.join(out_dir, "duplicates", f"part-{i:05d}.parquet"), labels[i],
                                           exact_by_id[i], roots[i], [sims[i]]) for i in range(k)])
    log.info("dedup graph: %d connected-component rounds, similarities and labels (%.1fs)", rounds, time.time() - t0)
    stats = {"candidate_edges": int(n_candidates), "verified_edges": int(n_verified), "cc_rounds": rounds,
             "exact_clusters": sum(s["exact_clusters"] for s in part_stats),
             "near_clusters": sum(s["near_clusters"] for s in part_stats),
             "duplicate_rows": sum(s["duplicate_rows"] for s in part_stats)}
    return stats


@ray.remote
def _count(df: pd.DataFrame) -> int:
    return len(df)


@ray.remote
def _empty_edges() -> pd.DataFrame:
    return pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object)})
