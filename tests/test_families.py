"""Duplicate families (issue 31, section 2): exact and near links together form one connected component, whose
kept document (its smallest id) is every member's ``representative_id``, with one ``cluster_id``;
``duplicate_of`` stays the document a row was matched against."""

import os
import random

import pandas as pd
import pytest

from app.refine.components import connected_components_ref

NO_MODELS = ["perplexity.enabled=false", "toxicity.enabled=false"]
DUP_REASONS = {"exact_duplicate", "near_duplicate"}


def assert_families_closed(out: str) -> dict:
    """The invariants of ``duplicates/`` and of the written rows, whatever the corpus: one row per family member;
    every duplicates/ row and every row dropped as a duplicate names its family's kept document (not dropped as a
    duplicate, its own representative) and the family's one cluster_id, one cluster_id per family and one family
    per cluster_id, the families being the connected components of the duplicates/ rows' links. Returns the rows
    by id."""
    from tests.test_refine import read_dir

    dup = read_dir(os.path.join(out, "duplicates"))
    rows = {r["id"]: r for r in read_dir(os.path.join(out, "kept")) + read_dir(os.path.join(out, "dropped"))}
    ids = [r["id"] for r in dup]
    assert len(ids) == len(set(ids)), "a document with two duplicates/ rows"
    # families: components of every link the table states (matched against, and named representative)
    links = [(r["id"], r["representative_id"]) for r in dup] + [(r["id"], r["duplicate_of"]) for r in dup
                                                                 if r["duplicate_of"] is not None]
    family = connected_components_ref(links, ids)
    by_id = {r["id"]: r for r in dup}
    clusters: dict = {}
    for r in dup:
        root = family[r["id"]]
        assert r["representative_id"] == root, (r, root)  # the smallest id of its connected component
        assert clusters.setdefault(root, r["cluster_id"]) == r["cluster_id"], (r, clusters[root])  # one id a family
        rep = rows[root]
        assert not DUP_REASONS & set(rep.get("drop_reasons") or []), rep  # the kept one is not dropped as a duplicate
        assert rep["representative_id"] == root and by_id[root]["duplicate_of"] is None
        if r["duplicate_of"] is not None:
            assert r["duplicate_of"] in by_id and rows[r["id"]]["duplicate_of"] == r["duplicate_of"]
    assert len(set(clusters.values())) == len(clusters), "two families share a cluster_id"
    for id_, row in rows.items():
        if DUP_REASONS & set(row.get("drop_reasons") or []):
            d = by_id[id_]
            assert (row["representative_id"], row["cluster_id"]) == (d["representative_id"], d["cluster_id"]), row
        elif id_ not in by_id:
            assert row["representative_id"] is None and row["cluster_id"] is None
    return rows


# ------------------------------------------------------------------------------------------ pure core


def test_family_rows_name_the_kept_document_of_the_whole_family():
    """a kept; b a near duplicate of a; b1, b2 exact copies of b (b is their group's representative); e, e1 an
    exact group alone: the copies of b name a as representative, b as duplicate_of, in a's one cluster."""
    from app.refine.families import family_answers, family_rows, labels_of

    exact = pd.DataFrame({"id": ["b", "b1", "b2", "b", "e", "e1"], "exact_of": ["b", "b", "b", "b", "e", "e"]})
    roots = pd.DataFrame({"node": ["a", "b", "a"], "root": ["a", "a", "a"]})  # a's row from two star partitions
    sims = pd.DataFrame({"a": ["a"], "b": ["b"], "similarity": [0.9]})
    requests = pd.DataFrame({"a": ["b", "b", "e"], "dest": [0, 0, 0]})
    families = family_answers(roots, requests).drop(columns="dest")
    assert families.set_index("a").to_dict("index") == {"b": {"root": "a", "near": True},
                                                        "e": {"root": "e", "near": False}}
    dup = family_rows(exact, roots, sims, families)
    got = {r["id"]: (r["representative_id"], r["cluster_id"], r["duplicate_of"], r["kind"], r["similarity"])
           for r in dup.to_dict("records")}
    assert got == {"a": ("a", "near:a", None, "near", 1.0), "b": ("a", "near:a", "a", "near", 0.9),
                   "b1": ("a", "near:a", "b", "exact", 1.0), "b2": ("a", "near:a", "b", "exact", 1.0),
                   "e": ("e", "exact:e", None, "exact", 1.0), "e1": ("e", "exact:e", "e", "exact", 1.0)}
    labels = {r["id"]: r for r in labels_of(dup).to_pylist()}
    assert labels["b1"] == {"id": "b1", "exact_of": "b", "near_of": None, "near_similarity": None,
                            "representative_id": "a", "cluster_id": "near:a"}
    assert labels["b"]["near_of"] == "a" and labels["b"]["exact_of"] is None and labels["b"]["near_similarity"] == 0.9
    assert labels["a"]["exact_of"] is None and labels["a"]["near_of"] is None and labels["a"]["representative_id"] == "a"


# ------------------------------------------------------------------------------------------ end to end


def _edit(text: str, n: int, seed: int) -> str:
    w = text.split()
    rnd = random.Random(seed)
    for i in rnd.sample(range(10, len(w) - 10), n):
        w[i] = f"famword{seed}x{i}"
    return " ".join(w)


def test_exact_copies_of_a_near_duplicate_name_the_kept_document(ray_local, real_texts, tmp_path):
    """Families of every shape of exact and near links, over 3 graph parts. The brief's: f1-a kept, f1-b a near
    duplicate of it, f1-b1 and f1-b2 exact copies of f1-b (so f1-b is their exact group's representative); the
    others: copies of the kept one too, a near duplicate with the smallest id, two near duplicates each with
    copies, and an exact group and a near pair alone. Checked against brute force (exact text or Jaccard >= 0.8,
    union-find): one cluster_id per family, its smallest id everyone's representative_id, duplicate_of as matched
    (an exact copy: its group's smallest id; a near duplicate: the kept document), and the one kept document."""
    from app.config import RefineConfig, load_config
    from app.refine.minhash import jaccard, shingles
    from app.refine.normalize import normalize
    from app.refine.pipeline import run_refine
    from tests.conftest import write_jsonl

    base = []
    for t in real_texts:  # mutually dissimilar real texts of 150 words
        t = " ".join(t.split()[:150])
        if len(t.split()) == 150 and all(jaccard(shingles(t), shingles(o)) < 0.3 for o in base):
            base.append(t)
        if len(base) == 11:
            break
    assert len(base) == 11
    T = base
    copy = lambda t: "  " + t.replace(" ", "\n ", 2) + "\n"  # noqa: E731  (the same text after normalization)
    docs = {
        "f1-a": T[0], "f1-b": _edit(T[0], 1, 1), "f1-b1": copy(_edit(T[0], 1, 1)), "f1-b2": _edit(T[0], 1, 1),
        "f2-a": T[1], "f2-a1": copy(T[1]), "f2-b": _edit(T[1], 1, 2), "f2-b1": _edit(T[1], 1, 2),
        "f3-0": _edit(T[2], 1, 3), "f3-1": T[2], "f3-2": copy(T[2]),  # the near duplicate has the smallest id
        "f4-a": T[3], "f4-b": _edit(T[3], 1, 4), "f4-b1": _edit(T[3], 1, 4), "f4-c": _edit(T[3], 2, 5),
        "f4-c1": copy(_edit(T[3], 2, 5)),
        "f5-a": T[4], "f5-b": copy(T[4]),  # an exact group alone
        "f6-a": T[5], "f6-b": _edit(T[5], 1, 6),  # a near pair alone
        **{f"s-{i}": T[6 + i] for i in range(5)},
    }
    ids = sorted(docs)
    norm = {i: normalize(docs[i]) for i in ids}
    sh = {i: shingles(docs[i]) for i in ids}
    edges = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if norm[a] == norm[b] or jaccard(sh[a], sh[b]) >= 0.8]
    truth = connected_components_ref(edges, ids)  # id -> smallest id of its family
    assert truth["f1-b2"] == truth["f1-b"] == "f1-a" and truth["f3-2"] == "f3-0" and truth["f4-c1"] == "f4-a"
    exact_rep = {i: min(j for j in ids if norm[j] == norm[i]) for i in ids}
    assert exact_rep["f1-b2"] == "f1-b" and exact_rep["f3-2"] == "f3-1"

    path = write_jsonl(str(tmp_path / "in" / "s.jsonl"), [{"id": i, "text": docs[i]} for i in ids])
    cfg = load_config(RefineConfig, None, [*NO_MODELS, "heuristics.enabled=false", "dedup.num_partitions=3"])
    report = run_refine([os.path.dirname(path)], str(tmp_path / "out"), cfg)

    from tests.test_refine import read_dir

    # the brief's family first: every row of it names f1-a, in one cluster, f1-b1/f1-b2 matched against f1-b
    f1 = [r for r in read_dir(str(tmp_path / "out" / "duplicates")) if r["id"].startswith("f1-")]
    assert {(r["id"], r["representative_id"]) for r in f1} == {(i, "f1-a") for i in ("f1-a", "f1-b", "f1-b1", "f1-b2")}
    assert len({r["cluster_id"] for r in f1}) == 1 and len(f1) == 4
    dropped = {r["id"]: r for r in read_dir(str(tmp_path / "out" / "dropped"))}
    assert {i: (dropped[i].get("representative_id"), dropped[i]["duplicate_of"]) for i in ("f1-b", "f1-b1", "f1-b2")} == {
        "f1-b": ("f1-a", "f1-a"), "f1-b1": ("f1-a", "f1-b"), "f1-b2": ("f1-a", "f1-b")}

    rows = assert_families_closed(str(tmp_path / "out"))
    dup = {r["id"]: r for r in read_dir(str(tmp_path / "out" / "duplicates"))}
    families = {}
    for i in ids:
        families.setdefault(truth[i], []).append(i)
    members = {i for f in families.values() if len(f) > 1 for i in f}
    assert set(dup) == members
    assert {r["id"] for r in read_dir(str(tmp_path / "out" / "kept"))} == set(families)  # one kept per family
    assert len({dup[i]["cluster_id"] for i in members}) == len([f for f in families.values() if len(f) > 1])
    for i in sorted(members):
        d, row = dup[i], rows[i]
        assert d["representative_id"] == row["representative_id"] == truth[i], (i, d, row["representative_id"])
        assert row["cluster_id"] == d["cluster_id"] == dup[truth[i]]["cluster_id"], (i, d)
        if i == truth[i]:
            assert row.get("drop_reason") is None and d["duplicate_of"] is None
        elif exact_rep[i] != i:  # an exact copy: matched against its group's representative
            assert (row["drop_reason"], row["duplicate_of"], d["duplicate_of"], d["kind"], d["similarity"]) == (
                "exact_duplicate", exact_rep[i], exact_rep[i], "exact", 1.0), (i, d, row["duplicate_of"])
        else:  # a near duplicate (an exact group's representative, or alone): matched against the kept one
            assert (row["drop_reason"], row["duplicate_of"], d["duplicate_of"], d["kind"]) == (
                "near_duplicate", truth[i], truth[i], "near"), (i, d)
            assert d["similarity"] == pytest.approx(jaccard(sh[i], sh[truth[i]]))
    assert dup["f5-b"]["cluster_id"] == "exact:f5-a" and dup["f1-b2"]["cluster_id"] == "near:f1-a"
    d = report["dedup"]
    assert d["families"] == 6 and d["duplicate_rows"] == len(members)
    # the dashboard shows each sampled duplicate beside the document it was matched against
    for reason in DUP_REASONS:
        for s in report["samples"].get(reason, []):
            assert s["matched"]["id"] == rows[s["id"]]["duplicate_of"]
