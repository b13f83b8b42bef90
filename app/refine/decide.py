"""The one place thresholds are applied: keep or drop, with every reason.

``drop_reason`` is the first failing reason in a fixed order: ``exact_duplicate``, ``near_duplicate``,
then the heuristic rules in ``heuristics.RULES`` order; ``drop_reasons`` lists them all.
"""

from __future__ import annotations

from typing import Mapping

import pyarrow as pa

from app.refine.heuristics import RULES, SIGNALS, failing_rules

REASON_ORDER = ["exact_duplicate", "near_duplicate"] + [name for name, _f, _fn in RULES]


def decide_step(table: pa.Table, labels: Mapping[str, tuple], heuristics_cfg, heuristics_enabled: bool) -> pa.Table:
    """Adds ``duplicate_of``, ``near_similarity``, ``drop_reason``, ``drop_reasons``.

    ``labels`` maps a duplicate document's id to ``(exact_of, near_of, near_similarity)``.
    """
    ids = table.column("id").to_pylist()
    sig_cols = {n: table.column(n).to_pylist() for n in SIGNALS} if heuristics_enabled else {}
    dup_of, near_sim, reason, reasons = [], [], [], []
    for i, id_ in enumerate(ids):
        rs: list[str] = []
        exact_of, near_of, sim = labels.get(id_, (None, None, None))
        if exact_of is not None:
            rs.append("exact_duplicate")
        if near_of is not None:
            rs.append("near_duplicate")
        if heuristics_enabled:
            rs.extend(failing_rules({n: sig_cols[n][i] for n in SIGNALS}, heuristics_cfg))
        dup_of.append(exact_of if exact_of is not None else near_of)
        near_sim.append(sim)
        reason.append(rs[0] if rs else None)
        reasons.append(rs)
    return (table.append_column("duplicate_of", pa.array(dup_of, pa.string()))
            .append_column("near_similarity", pa.array(near_sim, pa.float64()))
            .append_column("drop_reason", pa.array(reason, pa.string()))
            .append_column("drop_reasons", pa.array(reasons, pa.list_(pa.string()))))
