"""Duplicate families: the pure core of ``components``' last step (no Ray, plain DataFrames).

A family is a connected component of exact and near links. Near candidates link exact representatives only
(``lsh.bucket_edges``), so a family is the near component of its exact representatives plus their copies, and its
kept document - its smallest id - is the root of that near component, or the exact representative when no near
link reaches it. ``family_answers`` gives an exact representative's family (asked for by the parts that hold its
copies); ``family_rows`` makes one ``duplicates/`` row per member: the family's kept document as
``representative_id``, the family's one ``cluster_id``, and ``duplicate_of`` the document the row was matched
against (provenance: an exact copy's exact representative, a near duplicate's root); ``labels_of`` turns them into
the labels ``decide`` reads.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

DUP_SCHEMA = pa.schema([("id", pa.string()), ("cluster_id", pa.string()), ("representative_id", pa.string()),
                        ("duplicate_of", pa.string()), ("kind", pa.string()), ("similarity", pa.float64())])
LABEL_SCHEMA = pa.schema([("id", pa.string()), ("exact_of", pa.string()), ("near_of", pa.string()),
                          ("near_similarity", pa.float64()), ("representative_id", pa.string()),
                          ("cluster_id", pa.string())])


def unique_nodes(roots: pd.DataFrame) -> pd.DataFrame:
    """(node, root) rows, one per node (a node's row can come from several star partitions)."""
    if not len(roots):
        return pd.DataFrame({"node": pd.Series([], dtype=object), "root": pd.Series([], dtype=object)})
    return roots.drop_duplicates("node").reset_index(drop=True)


def family_answers(roots: pd.DataFrame, requests: pd.DataFrame) -> pd.DataFrame:
    """Family requests (a, dest) for exact representatives a of this part, and this part's (node, root) rows of
    the near components -> (a, root, near, dest): the kept document of a's family (the root of a's near
    component, or a itself when no near link reaches a) and whether the family has near links."""
    if not len(requests):
        return pd.DataFrame({"a": pd.Series([], dtype=object), "root": pd.Series([], dtype=object),
                             "near": pd.Series([], dtype=bool), "dest": pd.Series([], dtype=np.int64)})
    req = requests.drop_duplicates().reset_index(drop=True)
    root_of = unique_nodes(roots).set_index("node")["root"]
    root = req["a"].map(root_of)
    near = root.notna()
    return pd.DataFrame({"a": req["a"].values, "root": root.where(near, req["a"]).values, "near": near.values,
                         "dest": req["dest"].values})


def _cluster_id(root, near) -> pd.Series:
    """One id per family: ``near:<kept id>`` when near links join it, ``exact:<kept id>`` for copies only."""
    return pd.Series(np.where(np.asarray(near, dtype=bool), "near:", "exact:"), dtype=object) + pd.Series(
        np.asarray(root, dtype=object), dtype=object)


def family_rows(exact: pd.DataFrame, roots: pd.DataFrame, sims: pd.DataFrame, families: pd.DataFrame) -> pd.DataFrame:
    """One ``duplicates/`` row per document of this part that belongs to a family of two or more documents.

    exact     (id, exact_of): the exact groups' members of this part, exact_of the group's smallest id
              (``exact_of == id``: the group's representative)
    roots     (node, root): the members of near components (exact representatives only) of this part
    sims      (a, b, similarity): b's Jaccard similarity to its root a
    families  (a, root, near): for the exact representatives a of this part's copies, their family's kept
              document and whether near links join the family (``family_answers``)

    Every row names the family's kept document (its smallest id) as ``representative_id``, and the family's one
    ``cluster_id``; ``duplicate_of`` is the document the row was matched against: an exact copy's exact
    representative (``similarity`` 1.0), a near duplicate's root (``similarity`` to it), none for the kept one.
    A representative of an exact group that is also a near duplicate has one row, its near one.
    """
    roots = unique_nodes(roots)
    frames = []
    if len(roots):
        is_root = (roots["node"] == roots["root"]).values
        sim_of = dict(zip(sims["b"], sims["similarity"])) if len(sims) else {}
        missing = [n for n in roots["node"][~is_root] if n not in sim_of]
        if missing:  # pragma: no cover - every non-root is scored against its root
            raise RuntimeError(f"{len(missing)} near duplicates without a similarity, e.g. {missing[:3]}")
        frames.append(pd.DataFrame({
            "id": roots["node"].values, "cluster_id": _cluster_id(roots["root"].values, np.ones(len(roots))).values,
            "representative_id": roots["root"].values,
            "duplicate_of": np.where(is_root, None, roots["root"].values),
            "kind": "near", "similarity": [1.0 if r else sim_of[n] for n, r in zip(roots["node"], is_root)]}))
    if len(exact):
        exact = exact.drop_duplicates().reset_index(drop=True)
        in_near = exact["id"].isin(set(roots["node"])).values
        own = (exact["id"] == exact["exact_of"]).values
        # a representative in a near component: its near row stands for it
        reps = exact[own & ~in_near]
        copies = exact[~own]
        if len(copies):
            fam = families.drop_duplicates("a").set_index("a") if len(families) else pd.DataFrame(columns=["root", "near"])
            root = copies["exact_of"].map(fam["root"])
            if root.isna().any():  # pragma: no cover - every copy's representative is asked for
                raise RuntimeError(f"{int(root.isna().sum())} exact copies without their family's kept document")
            near = copies["exact_of"].map(fam["near"]).astype(bool)
        else:
            root, near = copies["exact_of"], pd.Series([], dtype=bool)
        frames.append(pd.DataFrame({
            "id": np.concatenate([reps["id"].values, copies["id"].values]),
            "cluster_id": np.concatenate([_cluster_id(reps["id"].values, np.zeros(len(reps))).values,
                                          _cluster_id(root.values, near.values).values]),
            "representative_id": np.concatenate([reps["id"].values, root.values]),
            "duplicate_of": np.concatenate([np.full(len(reps), None, dtype=object), copies["exact_of"].values]),
            "kind": "exact", "similarity": 1.0}))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype=float if c == "similarity" else object) for c in DUP_SCHEMA.names})
    dup = pd.concat(frames, ignore_index=True)[DUP_SCHEMA.names]
    dup["duplicate_of"] = dup["duplicate_of"].astype(object).where(dup["duplicate_of"].notna(), None)
    if dup["id"].duplicated().any():  # pragma: no cover - copies are never in the near graph
        raise RuntimeError(f"documents in two families: {dup['id'][dup['id'].duplicated()].tolist()[:3]}")
    return dup.sort_values(["cluster_id", "id"]).reset_index(drop=True)


def labels_of(dup: pd.DataFrame) -> pa.Table:
    """``duplicates/`` rows -> the labels ``decide`` reads: one row per family member (its kept document too)."""
    dup = dup.sort_values("id")
    matched = dup["duplicate_of"].notna()
    exact = matched & (dup["kind"] == "exact")
    near = matched & (dup["kind"] == "near")
    return pa.table({
        "id": pa.array(dup["id"].tolist(), pa.string()),
        "exact_of": pa.array(dup["duplicate_of"].where(exact, None).tolist(), pa.string()),
        "near_of": pa.array(dup["duplicate_of"].where(near, None).tolist(), pa.string()),
        "near_similarity": pa.array(dup["similarity"].astype(object).where(near, None).tolist(), pa.float64()),
        "representative_id": pa.array(dup["representative_id"].tolist(), pa.string()),
        "cluster_id": pa.array(dup["cluster_id"].tolist(), pa.string()),
    }, schema=LABEL_SCHEMA)
