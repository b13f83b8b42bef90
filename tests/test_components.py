import random

import pandas as pd
import pyarrow as pa
import pytest

from app.refine.components import connected_components_ref
from app.refine.lsh import bucket_edges


def _run_cc(ray, edges, k, held=None):
    from app.refine.components import _roots, _as_lists, connected_components

    chunks = [edges[i::3] for i in range(3)]
    refs = [ray.put(pd.DataFrame({"a": [a for a, _ in c], "b": [b for _, b in c]})) for c in chunks]
    stars, rounds = connected_components(refs, k, max_rounds=64, held=held)
    roots = _as_lists([_roots.options(num_returns=k).remote(k, s) for s in stars], k)
    out = {}
    for part in roots:
        for df in ray.get(part):
            out.update(dict(zip(df["node"], df["root"])))
    return out, rounds


def _name(i):
    return f"d{i:05d}"


@pytest.mark.parametrize("shape", ["chain", "star", "reversed_chain", "random"])
@pytest.mark.parametrize("k", [1, 4])
def test_connected_components_match_union_find(ray_local, shape, k):
    rnd = random.Random(3)
    n = 60
    if shape == "chain":
        edges = [(_name(i), _name(i + 1)) for i in range(n - 1)]
    elif shape == "reversed_chain":  # a chain whose ids decrease along it, in shuffled order
        edges = [(_name(n - i), _name(n - i - 1)) for i in range(n - 1)]
        rnd.shuffle(edges)
    elif shape == "star":
        edges = [(_name(30), _name(i)) for i in range(n) if i != 30]
    else:
        edges = [(_name(rnd.randrange(n)), _name(rnd.randrange(n))) for _ in range(45)]
        edges = [(a, b) for a, b in edges if a != b]
    nodes = sorted({x for e in edges for x in e})
    got, rounds = _run_cc(ray_local, edges, k)
    assert got == connected_components_ref(edges, nodes)
    assert rounds <= 12


def test_bucket_edges_exact_and_near():
    t = pa.table({"key": ["e1"] * 3, "id": ["c", "a", "b"], "exact_hash": ["h"] * 3})
    e = bucket_edges(t).to_pylist()
    assert e == [{"a": "a", "b": "b", "kind": "exact"}, {"a": "a", "b": "c", "kind": "exact"}]
    # near bucket: exact twins collapse to their smallest id; star + chain edges
    t = pa.table({"key": ["b0:1"] * 5, "id": ["d", "a", "c", "b", "e"], "exact_hash": ["x", "y", "z", "x", "w"]})
    e = {(r["a"], r["b"]) for r in bucket_edges(t, all_pairs_max=3).to_pylist()}  # 4 distinct texts: star + chain
    assert e == {("a", "b"), ("a", "c"), ("a", "e"), ("b", "c"), ("c", "e")}
    e = {(r["a"], r["b"]) for r in bucket_edges(t, all_pairs_max=4).to_pylist()}  # small bucket: every pair
    assert e == {("a", "b"), ("a", "c"), ("a", "e"), ("b", "c"), ("b", "e"), ("c", "e")}
    assert bucket_edges(t.slice(0, 1)).num_rows == 0
    # copies bucket (exact dedup off): the exact bucket's star, as near candidates
    t = pa.table({"key": ["cx"] * 3, "id": ["c", "a", "b"], "exact_hash": ["x"] * 3})
    assert bucket_edges(t).to_pylist() == [{"a": "a", "b": "b", "kind": "near"}, {"a": "a", "b": "c", "kind": "near"}]


def test_bucket_rows_key_copies_by_hash_whatever_the_exact_setting():
    from app.refine.lsh import bucket_rows

    t = pa.table({"id": ["a", "b"], "exact_hash": ["h1", "h2"], "bands": pa.array([[1, 2], [3, 4]], pa.list_(pa.uint64()))})
    keys = lambda **kw: sorted(bucket_rows(t, **kw).column("key").to_pylist())  # noqa: E731
    bands = [f"b{i}:{k:016x}" for i, k in [(0, 1), (1, 2), (0, 3), (1, 4)]]
    assert keys(exact=True, near=True) == sorted(["eh1", "eh2", *bands])
    assert keys(exact=False, near=True) == sorted(["ch1", "ch2", *bands])
    assert keys(exact=True, near=False) == ["eh1", "eh2"]


def test_a_hub_is_spread_over_the_parts(ray_local):
    """A star of n leaves around its smallest id (a cluster of boilerplate pages): no task of verification or of
    connected components holds more than about its part's share of it (before: all n edges in the hub's task)."""
    from app.refine.components import _route_pairs, connected_components

    n, k = 2000, 4
    hub = _name(0)
    edges = [(hub, _name(i)) for i in range(1, n + 1)]
    routed = _route_pairs(pd.DataFrame({"a": [a for a, _ in edges], "b": [b for _, b in edges]}), k)
    assert sum(map(len, routed[:k])) == n and max(map(len, routed[:k])) < 0.35 * n  # pairs where b lives
    assert sum(map(len, routed[k:])) == k  # the hub's text is asked for once per part, not once per pair
    held = []
    got, rounds = _run_cc(ray_local, edges, k, held)
    assert got == {x: hub for e in edges for x in e}
    assert held and max(held) < 0.35 * n, held


def test_split_edges_sends_a_representative_row_once(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from app.refine.components import _split_edges

    m = 500
    pq.write_table(pa.table({"a": ["a"] * m + ["x"] * 3, "b": [f"b{i:04d}" for i in range(m)] + ["y"] * 3,
                             "kind": ["exact"] * m + ["near"] * 3}), tmp_path / "e.parquet")
    k = 2
    out = ray_local.get(_split_edges.options(num_returns=4 * k).remote(str(tmp_path / "e.parquet"), k))
    pairs, requests, exact, families = out[:k], out[k:2 * k], out[2 * k:3 * k], out[3 * k:]
    rows = pd.concat(exact)
    assert len(rows) == m + 1 and (rows["id"] == "a").sum() == 1  # each duplicate once, the representative once
    assert sum(map(len, pairs)) == 1 and sum(map(len, requests)) == 1  # the pair from 3 band buckets: once
    # the copies' parts ask a's part for a's family once each, not once per copy
    fam = pd.concat(families)
    assert sorted(fam["dest"]) == list(range(k)) and set(fam["a"]) == {"a"} and len(families[0]) == len(fam)


def test_a_giant_cluster_end_to_end(ray_local, real_texts, tmp_path):
    """One cluster of 120 edited copies among 120 unrelated documents, 4 graph parts: one cluster, labelled to
    its smallest id, and no verification or components task held the bulk of it."""
    import os
    import random

    from app.config import RefineConfig, load_config
    from app.refine.pipeline import run_refine
    from tests.conftest import write_jsonl
    from tests.test_refine import read_dir

    rnd = random.Random(5)
    pool = [w for t in real_texts for w in t.split() if w.isalpha()]
    base = [rnd.choice(pool) for _ in range(300)]
    docs = {}
    for i in range(120):
        w = list(base)
        for j in rnd.sample(range(300), 3):
            w[j] = f"g{i}x{j}"
        docs[f"copy-{i:04d}"] = " ".join(w)
        docs[f"other-{i:04d}"] = " ".join(rnd.choice(pool) for _ in range(300))
    path = write_jsonl(str(tmp_path / "in.jsonl"), [{"id": k, "text": v} for k, v in docs.items()])
    cfg = load_config(RefineConfig, None, ["heuristics.enabled=false", "perplexity.enabled=false",
                                           "toxicity.enabled=false", "dedup.num_partitions=4"])
    rep = run_refine([path], str(tmp_path / "out"), cfg)
    dup = read_dir(os.path.join(tmp_path, "out", "duplicates"))
    assert {r["id"] for r in dup} == {k for k in docs if k.startswith("copy")}
    assert {r["representative_id"] for r in dup} == {"copy-0000"}
    assert all(r["similarity"] >= 0.8 for r in dup)
    d = rep["dedup"]
    assert d["near_clusters"] == 1 and d["candidate_edges"] >= 2 * 119
    assert d["max_task_pairs"] < 0.45 * d["candidate_edges"]  # a part's share (1/4), not the whole cluster
    assert d["max_task_cc_rows"] < 0.45 * d["verified_edges"]
