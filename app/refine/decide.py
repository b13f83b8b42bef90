"""The one place thresholds are applied: keep or drop, with every reason.

``drop_reason`` is the first failing reason in a fixed order: ``exact_duplicate``, ``near_duplicate``,
then the heuristic rules in ``heuristics.RULES`` order, then ``high_perplexity`` and ``toxic``;
``drop_reasons`` lists them all. ``decide_step`` applies the dedup and heuristic rules; ``quality_step``
(after the model steps, with per-source statistics) adds the quality score, the bucket and the model rules.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.refine.heuristics import RULES, SIGNALS, failing_rules

REASON_ORDER = ["exact_duplicate", "near_duplicate"] + [name for name, _f, _fn in RULES]


class DuplicateLabel(NamedTuple):
    """What the duplicate graph says of one member of a duplicate family (``components.labels_of``)."""

    exact_of: Optional[str]  # the exact copy's group representative (None: not an exact copy)
    near_of: Optional[str]  # the document a near duplicate was matched against (None: not a near duplicate)
    near_similarity: Optional[float]
    representative_id: str  # the family's kept document (its smallest id)
    cluster_id: str  # the family's one id


NO_LABEL = DuplicateLabel(None, None, None, None, None)


def read_labels(path: str) -> dict[str, DuplicateLabel]:
    """One part's labels file -> id -> ``DuplicateLabel``."""
    t = pq.read_table(path, columns=list(DuplicateLabel._fields) + ["id"])
    return dict(zip(t.column("id").to_pylist(), map(DuplicateLabel._make, zip(
        *(t.column(f).to_pylist() for f in DuplicateLabel._fields)))))


def decide_step(table: pa.Table, labels: Mapping[str, DuplicateLabel], heuristics_cfg,
                heuristics_enabled: bool) -> pa.Table:
    """Adds ``duplicate_of``, ``near_similarity``, ``representative_id``, ``cluster_id``, ``drop_reason``,
    ``drop_reasons``.

    ``labels`` maps each member of a duplicate family (its kept document too) to its ``DuplicateLabel``;
    ``representative_id`` and ``cluster_id`` are null outside families.
    """
    ids = table.column("id").to_pylist()
    sig_cols = {n: table.column(n).to_pylist() for n in SIGNALS} if heuristics_enabled else {}
    dup_of, near_sim, rep_id, cluster, reason, reasons = [], [], [], [], [], []
    for i, id_ in enumerate(ids):
        rs: list[str] = []
        label = labels.get(id_, NO_LABEL)
        if label.exact_of is not None:
            rs.append("exact_duplicate")
        if label.near_of is not None:
            rs.append("near_duplicate")
        if heuristics_enabled:
            rs.extend(failing_rules({n: sig_cols[n][i] for n in SIGNALS}, heuristics_cfg))
        dup_of.append(label.exact_of if label.exact_of is not None else label.near_of)
        near_sim.append(label.near_similarity)
        rep_id.append(label.representative_id)
        cluster.append(label.cluster_id)
        reason.append(rs[0] if rs else None)
        reasons.append(rs)
    return (table.append_column("duplicate_of", pa.array(dup_of, pa.string()))
            .append_column("near_similarity", pa.array(near_sim, pa.float64()))
            .append_column("representative_id", pa.array(rep_id, pa.string()))
            .append_column("cluster_id", pa.array(cluster, pa.string()))
            .append_column("drop_reason", pa.array(reason, pa.string()))
            .append_column("drop_reasons", pa.array(reasons, pa.list_(pa.string()))))


# ------------------------------------------------------------------------------ the quality decision
#
# quality_score (higher is better), per document of source s:
#     z        = (NLL - mean_s(NLL)) / max(std_s(NLL), decide.min_nll_std)       per-source standardized NLL
#     penalty  = sum over the repetition/symbol signals r of min(signal_r / threshold_r, 3)
#                r in {symbol ratio, duplicate-line chars, duplicate-paragraph chars, top 2-gram chars,
#                      duplicated 5-gram chars}, thresholds from the heuristics config (a signal at its
#                      Gopher threshold costs as much as NLL one standard deviation above its source's mean)
#     quality_score = -z - penalty      (-penalty without an NLL; null with neither)
# quality_bucket (CCNet): the document's NLL percentile within its source: head < head_percentile <= middle
# < tail_percentile <= tail.

MODEL_REASONS = ["high_perplexity", "toxic"]
REASON_ORDER = REASON_ORDER + MODEL_REASONS
NLL_EDGES = np.linspace(0.0, 20.0, 2001)  # nats; NLL above 20 lands in the last bin
TOX_EDGES = np.linspace(0.0, 1.0, 1001)
PENALTY_SIGNALS = [("h_symbol_ratio", "max_symbol_word_ratio"), ("h_dup_line_chars", "max_dup_line_char_frac"),
                   ("h_dup_para_chars", "max_dup_para_char_frac"), ("h_top2gram", "max_top_2gram_char_frac"),
                   ("h_dup5gram", "max_dup_5gram_char_frac")]


def _hist(values, edges) -> np.ndarray:
    v = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(np.int64)


def batch_stats(table: pa.Table) -> dict:
    """Per-source mergeable statistics of the scored documents: NLL moments + histograms."""
    out: dict = {}
    cols = table.column_names
    sources = table.column("source").to_pylist()
    nll = table.column("ppl_nll").to_pylist() if "ppl_nll" in cols else [None] * len(sources)
    tox = table.column("toxicity").to_pylist() if "toxicity" in cols else [None] * len(sources)
    by_src: dict = {}
    for s, n, t in zip(sources, nll, tox):
        d = by_src.setdefault(s, ([], []))
        if n is not None:
            d[0].append(n)
        if t is not None:
            d[1].append(t)
    for s, (n, t) in by_src.items():
        out[s] = {"n": len(n), "sum": float(np.sum(n)) if n else 0.0, "sumsq": float(np.sum(np.square(n))) if n else 0.0,
                  "nll_hist": _hist(n, NLL_EDGES).tolist(), "tox_n": len(t), "tox_sum": float(np.sum(t)) if t else 0.0,
                  "tox_hist": _hist(t, TOX_EDGES).tolist()}
    return out


def merge_stats(parts) -> dict:
    out: dict = {}
    for part in parts:
        for s, st in part.items():
            if s not in out:
                out[s] = {k: (list(v) if isinstance(v, list) else v) for k, v in st.items()}
                continue
            o = out[s]
            for k, v in st.items():
                o[k] = [a + b for a, b in zip(o[k], v)] if isinstance(v, list) else o[k] + v
    return out


def quantile(hist, edges, q: float) -> Optional[float]:
    """q-quantile of histogrammed values (linear inside the bin); None for an empty histogram."""
    h = np.asarray(hist, dtype=np.float64)
    if h.sum() == 0:
        return None
    cdf = np.concatenate([[0.0], np.cumsum(h)]) / h.sum()
    return float(np.interp(q, cdf, edges))


def summarize(stats: dict) -> dict:
    """Per source: NLL mean/std, the NLL quantile table (for percentiles), perplexity and toxicity quantiles."""
    out = {}
    for s, st in stats.items():
        n = st["n"]
        mean = st["sum"] / n if n else None
        var = max(st["sumsq"] / n - mean * mean, 0.0) if n else None
        qs = [quantile(st["nll_hist"], NLL_EDGES, q) for q in np.linspace(0, 1, 101)] if n else None
        row = {"scored": n, "nll_mean": mean, "nll_std": float(np.sqrt(var)) if n else None, "nll_quantiles": qs}
        for q in (0.1, 0.5, 0.9):
            v = quantile(st["nll_hist"], NLL_EDGES, q)
            row[f"perplexity_p{int(q * 100)}"] = float(np.exp(v)) if v is not None else None
            row[f"toxicity_p{int(q * 100)}"] = quantile(st["tox_hist"], TOX_EDGES, q)
        row["toxicity_mean"] = st["tox_sum"] / st["tox_n"] if st["tox_n"] else None
        out[s] = row
    return out


def percentile_of(value: float, qs: list) -> float:
    """Fraction of the source's documents with NLL below ``value`` (from its 101-point quantile table)."""
    q = np.asarray(qs)
    lo = np.searchsorted(q, value, side="left")
    hi = np.searchsorted(q, value, side="right")
    return float(np.clip((lo + hi) / 2 - 0.5, 0, 100) / 100)


def quality_step(table: pa.Table, summary: dict, decide_cfg, heuristics_cfg, heuristics_enabled: bool, *,
                 max_toxicity: Optional[float]) -> pa.Table:
    """Adds ``nll_z``, ``nll_percentile``, ``quality_score``, ``quality_bucket``; appends model drop reasons.

    ``max_toxicity``: the ``toxic`` threshold of the toxicity backend that scored (``decide.max_toxicity`` is
    one per backend; None: the rule is off)."""
    cols = table.column_names
    n = table.num_rows
    sources = table.column("source").to_pylist()
    nll = table.column("ppl_nll").to_pylist() if "ppl_nll" in cols else [None] * n
    ppl = table.column("perplexity").to_pylist() if "perplexity" in cols else [None] * n
    tox = table.column("toxicity").to_pylist() if "toxicity" in cols else [None] * n
    terms = [(sig, getattr(heuristics_cfg, thr)) for sig, thr in PENALTY_SIGNALS
             if heuristics_enabled and getattr(heuristics_cfg, thr)]
    sig_vals = {sig: table.column(sig).to_pylist() for sig, _ in terms}
    reasons = table.column("drop_reasons").to_pylist()
    z_col, pct_col, score_col, bucket_col, reason_col, reasons_col = [], [], [], [], [], []
    for i in range(n):
        src = summary.get(sources[i], {})
        z = pct = None
        if nll[i] is not None and src.get("scored"):
            z = (nll[i] - src["nll_mean"]) / max(src["nll_std"], decide_cfg.min_nll_std)
            pct = percentile_of(nll[i], src["nll_quantiles"])
        penalty = sum(min((sig_vals[s][i] or 0.0) / t, 3.0) for s, t in terms) if terms and sig_vals[terms[0][0]][i] is not None else None
        if z is None and penalty is None:
            score = None
        else:
            score = -(z or 0.0) - (penalty or 0.0)
        bucket = None if pct is None else ("head" if pct < decide_cfg.head_percentile else
                                           "tail" if pct >= decide_cfg.tail_percentile else "middle")
        rs = list(reasons[i] or [])
        if (ppl[i] is not None and decide_cfg.max_perplexity is not None and ppl[i] > decide_cfg.max_perplexity) or \
                (pct is not None and decide_cfg.max_nll_percentile is not None and pct > decide_cfg.max_nll_percentile):
            rs.append("high_perplexity")
        if tox[i] is not None and max_toxicity is not None and tox[i] > max_toxicity:
            rs.append("toxic")
        z_col.append(z)
        pct_col.append(pct)
        score_col.append(score)
        bucket_col.append(bucket)
        reason_col.append(rs[0] if rs else None)
        reasons_col.append(rs)
    table = table.drop_columns(["drop_reason", "drop_reasons"])
    return (table.append_column("nll_z", pa.array(z_col, pa.float64()))
            .append_column("nll_percentile", pa.array(pct_col, pa.float64()))
            .append_column("quality_score", pa.array(score_col, pa.float64()))
            .append_column("quality_bucket", pa.array(bucket_col, pa.string()))
            .append_column("drop_reason", pa.array(reason_col, pa.string()))
            .append_column("drop_reasons", pa.array(reasons_col, pa.list_(pa.string()))))
