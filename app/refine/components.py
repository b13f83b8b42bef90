"""The dedup graph on Ray core tasks: candidate verification, connected components, cluster labels.

Everything here is hash-partitioned by document id into ``K = dedup.num_partitions`` parts
(``lsh.partition_of``); the work files ``_work/docs/p=<k>/`` hold the documents of part k, so a task
that needs texts reads only its own part. No step collects all edges or all labels on one node:
each task holds one part (1/K of the edges it works on).

Giant clusters (boilerplate: millions of near copies) stay spread: a cluster's edges are stars around its
smallest id, so nothing is routed by that id. Pairs are verified in the part of their larger id, and the
anchor's text travels there once per part that asks for it (``_route_pairs``, ``_serve_texts``); connected
components route every edge by its larger end (``_by_larger``); a representative's own duplicates row is
sent once per edge file. Requests are deduplicated per map task, so the hub's part receives at most
(map tasks x K) requests, whatever the cluster's size.

Families: near candidates link exact representatives only (``lsh.bucket_edges``), so a family - a connected
component of exact and near links - is the near component of its exact representatives plus their copies. Its
kept document is its smallest id, the root of that near component (or the exact representative when no near
link reaches it). An exact copy lives in its own part and its exact representative's root in the
representative's part: each part asks the representative's part for it (``_families``, one request per
(representative, part) and map task, as for texts), so a giant exact group is never gathered either. Every
member gets one ``duplicates/`` row naming that kept document and the family's one ``cluster_id``
(``families.family_rows``); ``duplicate_of`` stays the document it was matched against.

Connected components: alternating Large-Star / Small-Star (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014), which converges in O(log n) rounds. Large-Star needs, for each node u,
m(u) = min(u, its neighbours): since a larger neighbour cannot be that minimum, m(u) is u's smallest smaller
neighbour, found in u's own part when edges are routed by their larger end; the parts that hold u's edges
to larger ids ask u's part for m(u). One round: a shuffle of edges and requests, a shuffle of the answers,
then Small-Star on Large-Star's output where it lies (its edges already sit with their larger end), all with
plain Ray tasks (``num_returns=K``) - a Ray Data groupby costs 7-9 s of fixed overhead per shuffle on a
2-CPU machine, so the few rounds use tasks instead. Written by hand: no library in the dependency set
offers distributed connected components.
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

from app.refine.families import DUP_SCHEMA, family_answers, family_rows, labels_of, unique_nodes
from app.refine.io import parquet_files, write_table
from app.refine.lsh import partition_of
from app.refine.minhash import jaccard, shingles

log = logging.getLogger(__name__)



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


def _route_pairs(df: pd.DataFrame, k: int) -> list[pd.DataFrame]:
    """Pairs (a, b) -> k pieces of pairs by part(b), then k pieces of requests (a, dest=part(b)) by part(a),
    one request per distinct (a, dest): an anchor with a million pairs asks for its text at most k times."""
    if not len(df):
        return _split_df(df, "b", k, ["a", "b"]) + _split_df(df, "a", k, ["a", "dest"])
    dest = partition_of(df["b"].tolist(), k)
    by_b = [df[dest == i].reset_index(drop=True) for i in range(k)]
    return by_b + _requests(df["a"].values, dest, k)


def _requests(a, dest, k: int) -> list[pd.DataFrame]:
    """Distinct (a, dest) -> k pieces by part(a): what part ``dest`` asks of a's part (a's text, or m(a))."""
    req = pd.DataFrame({"a": a, "dest": dest}).drop_duplicates().reset_index(drop=True)
    return _split_df(req, "a", k, ["a", "dest"])


@ray.remote
def _split_edges(path: str, k: int):
    """One file of candidate edges -> near pairs by part(b) and their text requests by part(a) (``_route_pairs``);
    exact edges as rows (id, exact_of) by part(id), a representative's own row (exact_of = id) once per file; and
    the family requests (a = exact_of, dest = part(id)) of the copies by part(a), one per distinct (a, dest)."""
    df = pq.read_table(path).to_pandas()
    near = df.loc[df["kind"] == "near", ["a", "b"]].drop_duplicates()  # one pair from several band buckets, once
    ex = df[df["kind"] == "exact"]
    reps = ex["a"].drop_duplicates()
    rows = pd.concat([
        pd.DataFrame({"id": ex["b"], "exact_of": ex["a"]}),
        pd.DataFrame({"id": reps, "exact_of": reps}),
    ], ignore_index=True)
    family_requests = _requests(ex["a"].values, partition_of(ex["b"].tolist(), k), k)
    return tuple(_route_pairs(near.reset_index(drop=True), k) + _split_df(rows, "id", k, ["id", "exact_of"])
                 + family_requests)


@ray.remote
def _serve_texts(files: list[str], k: int, *pieces):
    """Text requests (a, dest) for ids of this part -> per dest part: (a, text_a), each text once per dest."""
    req = _concat(pieces)
    if not len(req):
        return _ret(_split_df(req, "dest", k, ["a", "text_a"]))
    req = req.drop_duplicates().reset_index(drop=True)
    texts = _read_texts(files, req["a"])
    text_a = req["a"].map(texts)
    if text_a.isna().any():
        raise RuntimeError(f"{int(text_a.isna().sum())} graph ids have no document in {files[:1]}...")
    dest = req["dest"].values
    out = pd.DataFrame({"a": req["a"].values, "text_a": text_a.values})
    return _ret([out[dest == i].reset_index(drop=True) for i in range(k)])


@ray.remote(num_returns=2)
def _similarities(files: list[str], ngram: int, min_sim: Optional[float], n_pairs: int, *pieces):
    """Pairs (a, b) with b in this part (the first ``n_pairs`` pieces) and the texts of their a's (the rest) ->
    (a, b, similarity), keeping pairs with similarity >= min_sim; and (distinct pairs, pairs kept)."""
    df = _concat(pieces[:n_pairs])
    if not len(df):
        return pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object),
                             "similarity": pd.Series([], dtype=float)}), (0, 0)
    df = df.drop_duplicates(["a", "b"]).reset_index(drop=True)
    served = _concat(pieces[n_pairs:])
    text_a = dict(zip(served["a"], served["text_a"])) if len(served) else {}
    text_b = _read_texts(files, df["b"])
    cache: dict[str, set] = {}  # an anchor's shingles once per task, however many pairs it has here

    def sh(key: str, texts: dict) -> set:
        if key not in cache:
            cache[key] = shingles(texts[key], ngram)
        return cache[key]

    sims = [jaccard(sh(a, text_a), sh(b, text_b)) for a, b in zip(df["a"], df["b"])]
    out = pd.DataFrame({"a": df["a"].values, "b": df["b"].values, "similarity": np.asarray(sims, dtype=float)})
    if min_sim is not None:
        out = out[out["similarity"] >= min_sim - 1e-12].reset_index(drop=True)
    return out, (len(df), len(out))


def _verify(files: list[list[str]], pairs: list[list], requests: list[list], k: int, ngram: int,
            min_sim: Optional[float]) -> tuple[list, list]:
    """Pair pieces by part(b) and text requests by part(a) (``_route_pairs``) -> per part(b): (similarity frames,
    (distinct pairs, pairs kept) counts). Texts travel once per (id, part) asking for it: a hub's text is read once."""
    served = _as_lists([_serve_texts.options(num_returns=k).remote(files[i], k, *requests[i]) for i in range(k)], k)
    out = [_similarities.remote(files[j], ngram, min_sim, len(pairs[j]), *pairs[j], *served[j]) for j in range(k)]
    return [o[0] for o in out], [o[1] for o in out]


@ray.remote
def _by_larger(df: pd.DataFrame, k: int):
    """Undirected edges -> k pieces of rows (a, b), a < b, by part(b) (the larger end); then k pieces of requests
    for m(a) (a, dest=part(b)) by part(a), one per distinct (a, dest) (``_route_pairs``)."""
    return tuple(_route_pairs(_edges_out(df["a"].values, df["b"].values) if len(df) else _edges_out([], []), k))


@ray.remote
def _star_min(k: int, n_rows: int, *pieces):
    """Rows (a, b) with b in this part (the first ``n_rows`` pieces) and requests (a, dest) for ids in this part
    -> per dest: (u, m) with m(u) = min(u and its neighbours) = its smallest smaller neighbour, or u without one."""
    rows = _concat(pieces[:n_rows])
    req = _concat(pieces[n_rows:])
    if not len(req):
        return _ret(_split_df(req, "dest", k, ["u", "m"]))
    req = req.drop_duplicates().reset_index(drop=True)
    smallest = rows.groupby("b")["a"].min() if len(rows) else pd.Series([], dtype=object)
    m = req["a"].map(smallest)
    m = m.where(m.notna(), req["a"])
    out = pd.DataFrame({"u": req["a"].values, "m": m.values})
    dest = req["dest"].values
    return _ret([out[dest == i].drop_duplicates("u").reset_index(drop=True) for i in range(k)])


@ray.remote(num_returns=2)
def _large_star(n_rows: int, *pieces):
    """Large-Star for the rows (a, b), a < b, b in this part, given m(a) for every a among them: connect every
    larger neighbour b of a to m(a) = min(a and its neighbours) (a larger neighbour cannot be that minimum, so
    m(a) is a's smallest smaller neighbour, found where a is the larger end: ``_star_min``). A hub - the smallest
    id of a big cluster, the larger end of none of its edges - never has its edges in one task.

    Changes the graph iff some a with a larger neighbour has a smaller one. The output edges (m(a), b) have
    their larger end b in this part, so Small-Star takes them as they are. Returns the edges and (changed,
    rows held).
    """
    rows = _concat(pieces[:n_rows])
    if not len(rows):
        return _edges_out([], []), (False, 0)
    answers = _concat(pieces[n_rows:])
    m = rows["a"].map(dict(zip(answers["u"], answers["m"])))
    if m.isna().any():  # pragma: no cover - every a is asked for
        raise RuntimeError(f"large-star: {int(m.isna().sum())} rows without m(a)")
    changed = bool((m.values != rows["a"].values).any())
    return _edges_out(rows["b"].values, m.values), (changed, len(rows))


@ray.remote(num_returns=2)
def _small_star(d: pd.DataFrame):
    """Small-Star for the edges whose larger end u is in this part: with N = u's smaller neighbours and
    m = min(N), connect N + u to m.

    Changes the graph iff some u has two or more distinct smaller neighbours. Returns the edges and (changed,
    rows held).
    """
    if not len(d):
        return _edges_out([], []), (False, 0)
    d = pd.DataFrame({"u": d["b"].values, "v": d["a"].values})  # _edges_out: a < b, so b is the larger end
    m = d.groupby("u")["v"].min()
    changed = bool((d.groupby("u")["v"].nunique() > 1).any())
    nodes = np.concatenate([d["v"].values, m.index.values])
    roots = np.concatenate([d["u"].map(m).values, m.values])
    return _edges_out(nodes, roots), (changed, len(d))


def _edges_out(a, b) -> pd.DataFrame:
    """Deduplicated undirected edges (a < b), self-loops dropped."""
    a = np.asarray(a, dtype=object)
    b = np.asarray(b, dtype=object)
    if not len(a):
        return pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object)})
    lt = a < b
    df = pd.DataFrame({"a": np.where(lt, a, b), "b": np.where(lt, b, a)})
    return df[df["a"] != df["b"]].drop_duplicates().reset_index(drop=True)


@ray.remote
def _roots(k: int, *pieces):
    """Converged star edges -> (node, root) rows, split by part(node); roots label themselves."""
    d = _concat(pieces)
    if not len(d):
        return _ret(_split_df(pd.DataFrame(), "node", k, ["node", "root"]))
    rows = pd.concat([pd.DataFrame({"node": d["b"], "root": d["a"]}),
                      pd.DataFrame({"node": d["a"].drop_duplicates(), "root": d["a"].drop_duplicates()})],
                     ignore_index=True)
    rows = rows.groupby("node", as_index=False)["root"].min()
    return _ret(_split_df(rows, "node", k, ["node", "root"]))


@ray.remote
def _root_pairs(k: int, i: int, *pieces):
    """(node, root) rows of part ``i`` -> pairs (a=root, b=node) for non-roots (they stay here: part(node) = i)
    and text requests (root, i) by part(root)."""
    d = _concat(pieces)
    if len(d):
        d = d[d["node"] != d["root"]].drop_duplicates("node")
        d = pd.DataFrame({"a": d["root"].values, "b": d["node"].values})
    else:
        d = pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object)})
    return tuple([d] + _requests(d["a"].values, np.full(len(d), i, dtype=np.int64), k))


def _by_dest(df: pd.DataFrame, k: int) -> list[pd.DataFrame]:
    """Rows with a ``dest`` part number -> k pieces, piece i the rows for part i (``dest`` dropped)."""
    dest = df["dest"].values
    df = df.drop(columns="dest")
    return [df[dest == i].reset_index(drop=True) for i in range(k)]


@ray.remote
def _families(k: int, n_roots: int, *pieces):
    """This part's (node, root) rows (the first ``n_roots`` pieces) and the family requests for its ids ->
    per dest part: (a, root, near) (``family_answers``)."""
    return _ret(_by_dest(family_answers(_concat(pieces[:n_roots]), _concat(pieces[n_roots:])), k))


@ray.remote
def _finalize(out_path: str, labels_path: str, exact_pieces: list, root_pieces: list, sim_pieces: list,
              family_pieces: list) -> dict:
    """Write this part's ``duplicates/`` rows and its labels (one row per family member); its statistics."""
    exact = _concat(ray.get(exact_pieces))
    roots = unique_nodes(_concat(ray.get(root_pieces)))
    dup = family_rows(exact, roots, _concat(ray.get(sim_pieces)), _concat(ray.get(family_pieces)))
    table = pa.Table.from_pandas(dup, schema=DUP_SCHEMA, preserve_index=False)
    if table.num_rows:
        write_table(table, out_path)
    write_table(labels_of(dup), labels_path)
    exact = exact.drop_duplicates() if len(exact) else exact
    return {"exact_clusters": int((exact["id"] == exact["exact_of"]).sum()) if len(exact) else 0,
            "near_clusters": int((roots["node"] == roots["root"]).sum()),
            "families": int((dup["id"] == dup["representative_id"]).sum()),
            "duplicate_rows": int(len(dup))}


# ------------------------------------------------------------------------------------------ driver


def connected_components(edges: list, k: int, max_rounds: int, held: Optional[list] = None) -> tuple[list, int]:
    """Undirected edge DataFrames (refs, columns a, b) -> converged star edges per part, and rounds used
    (``held``, when given, gets the most edge rows one task held in each round).

    Converged when a whole round (large-star, then small-star) changes nothing: every component is then
    a star around its smallest id. Every edge is routed by its larger end, so a star's center - its smallest
    id, the larger end of none of its edges - never gathers its edges in one task: a component of a million
    nodes is spread over the k parts like any other edges (Large-Star and Small-Star only ever make stars
    around smaller ids; a node with many smaller neighbours in the input would gather those, which the
    candidate graph of ``lsh.bucket_edges`` does not have). One round: one shuffle of rows and of requests for
    m(a) (distinct per map task), one of the answers, and Small-Star on Large-Star's output where it is.
    """
    for rnd in range(1, max_rounds + 1):
        split = [_by_larger.options(num_returns=2 * k).remote(e, k) for e in edges]
        rows = [[s[i] for s in split] for i in range(k)]
        requests = [[s[k + i] for s in split] for i in range(k)]
        answers = _as_lists([_star_min.options(num_returns=k).remote(k, len(rows[i]), *rows[i], *requests[i])
                             for i in range(k)], k)
        large = [_large_star.remote(len(rows[i]), *rows[i], *answers[i]) for i in range(k)]
        small = [_small_star.remote(e) for e, _ in large]
        edges = [e for e, _ in small]
        flags = ray.get([c for _, c in large] + [c for _, c in small])
        changed = [c for c, _ in flags]
        if held is not None:
            held.append(max(n for _, n in flags))
        log.info("connected components: round %d, changed=%s, most rows in one task %d", rnd, any(changed),
                 max(n for _, n in flags))
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
    tasks Ray reconstructs by lineage). A big cluster's candidate edges are stars around its smallest id plus
    chains (``lsh.bucket_edges``; every pair only in buckets of at most ``all_pairs_max`` texts), so no id has
    many smaller neighbours, and no task holds much more than its part's
    share of a cluster: pairs are verified where their larger id lives, with the anchor's text sent there once
    (``_verify``), and connected components route edges by their larger end (``connected_components``). (A
    node with many *smaller* neighbours would still gather them in one task; the candidate graph has none.)
    """
    t0 = time.time()
    files = [parquet_files(work_docs, [p]) for p in range(k)]
    split = [_split_edges.options(num_returns=4 * k).remote(f, k) for f in edge_files]
    pairs = [[s[i] for s in split] for i in range(k)]
    requests = [[s[k + i] for s in split] for i in range(k)]
    exact_by_id = [[s[2 * k + i] for s in split] for i in range(k)]
    family_requests = [[s[3 * k + i] for s in split] for i in range(k)]

    # Verification: exact Jaccard of every candidate pair (or just its similarity when verify is off).
    verified, counts = _verify(files, pairs, requests, k, ngram, threshold if verify else None)
    counts = ray.get(counts)
    pair_counts = [n for n, _ in counts]
    n_candidates, n_verified = sum(pair_counts), sum(kept for _, kept in counts)
    log.info("dedup graph: %d candidate pairs, %d verified near edges (%.1fs)", n_candidates, n_verified, time.time() - t0)
    t0 = time.time()

    held: list[int] = []
    stars, rounds = (connected_components(verified, k, max_rounds, held) if n_verified
                     else ([_empty_edges.remote() for _ in range(k)], 0))
    roots = _as_lists([_roots.options(num_returns=k).remote(k, s) for s in stars], k)
    root_pairs = [_root_pairs.options(num_returns=1 + k).remote(k, i, *roots[i]) for i in range(k)]
    sims, _ = _verify(files, [[r[0]] for r in root_pairs], [[r[1 + j] for r in root_pairs] for j in range(k)],
                      k, ngram, None)

    # the kept document of each exact copy's family, from its exact representative's part
    families = _as_lists([_families.options(num_returns=k).remote(k, len(roots[j]), *roots[j], *family_requests[j])
                          for j in range(k)], k)

    labels = label_paths(labels_dir, k)
    part_stats = ray.get([_finalize.remote(os.path.join(out_dir, "duplicates", f"part-{i:05d}.parquet"), labels[i],
                                           exact_by_id[i], roots[i], [sims[i]], families[i]) for i in range(k)])
    log.info("dedup graph: %d connected-component rounds, similarities and labels (%.1fs)", rounds, time.time() - t0)
    stats = {"candidate_edges": int(n_candidates), "verified_edges": int(n_verified), "cc_rounds": rounds,
             "exact_clusters": sum(s["exact_clusters"] for s in part_stats),
             "near_clusters": sum(s["near_clusters"] for s in part_stats),
             "families": sum(s["families"] for s in part_stats),
             "duplicate_rows": sum(s["duplicate_rows"] for s in part_stats),
             # skew: the most candidate pairs one verification task held, the most edges one CC task held
             "max_task_pairs": max(pair_counts, default=0), "max_task_cc_rows": max(held, default=0)}
    return stats


@ray.remote
def _empty_edges() -> pd.DataFrame:
    return pd.DataFrame({"a": pd.Series([], dtype=object), "b": pd.Series([], dtype=object)})
