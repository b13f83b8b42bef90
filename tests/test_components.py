import random

import pandas as pd
import pyarrow as pa
import pytest

from app.refine.components import connected_components_ref
from app.refine.lsh import bucket_edges


def _run_cc(ray, edges, k):
    from app.refine.components import _roots, _as_lists, connected_components

    chunks = [edges[i::3] for i in range(3)]
    refs = [ray.put(pd.DataFrame({"a": [a for a, _ in c], "b": [b for _, b in c]})) for c in chunks]
    stars, rounds = connected_components(refs, k, max_rounds=64)
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
    e = {(r["a"], r["b"]) for r in bucket_edges(t).to_pylist()}
    assert e == {("a", "b"), ("a", "c"), ("a", "e"), ("b", "c"), ("c", "e")}
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
