"""report.json: counts, drop reasons, one row per shard, one row per step, histograms, samples, config,
versions; the accounting check. ``report.html`` is the data-quality dashboard (``app.dashboard``) rendered
from report.json alone.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata

from app.config import to_dict
from app.refine.heuristics import RULES
from app.refine.profile import PPL_LOG10_EDGES, TOX_EDGES, empty_profile


class AccountingError(RuntimeError):
    """input != kept + dropped + quarantined (in total or for some shard)."""


VERSIONED = ["distillery", "ray", "pyarrow", "numpy", "numba", "datasketch", "pandas", "torch", "transformers",
             "detoxify", "alt-profanity-check", "scikit-learn"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


SCORE_FIELDS = ["perplexity_p10", "perplexity_p50", "perplexity_p90", "toxicity_p10", "toxicity_p50", "toxicity_p90",
                "toxicity_mean"]


HEURISTIC_REASONS = frozenset(name for name, _f, _fn in RULES)


def _share(n, d):
    return n / d if d else None


def build_report(*, files, cfg, ingest: dict, output: dict, steps: dict, graph: dict, phases: dict, lsh: dict,
                 out_dir: str, scores: dict | None = None, toxicity: dict | None = None,
                 profile: dict | None = None, duplicate_samples: dict | None = None) -> dict:
    """``toxicity``: the report's toxicity section (``ToxicityChoice.as_report()``: available, reason, backend,
    model, labels, selection); None: toxicity was off."""
    profile = profile or empty_profile()
    toxicity = toxicity or {"available": False, "reason": "toxicity.enabled is false", "backend": None, "model": None,
                            "labels": [], "selection": ""}
    shards = []
    problems = []
    totals = {"input": 0, "kept": 0, "dropped": 0, "quarantined": 0}
    reasons: dict[str, int] = {}
    quarantine_reasons: dict[str, int] = {}
    for src in sorted(set(files) | set(ingest) | set(output)):
        i = ingest.get(src, {})
        o = output.get(src, {})
        n_in = i.get("records", 0)
        row = {
            "source": src,
            "docs": n_in,
            "kept": o.get("kept", 0),
            "dropped": o.get("dropped", 0),
            "quarantined": i.get("quarantined", 0),
            "exact_dup_ratio": (o.get("exact_duplicates", 0) / n_in) if n_in else 0.0,
            "near_dup_ratio": (o.get("near_duplicates", 0) / n_in) if n_in else 0.0,
            "drop_reasons": o.get("drop_reasons", {}),
            "quarantine_reasons": i.get("quarantine_reasons", {}),
            "scored": (scores or {}).get(src, {}).get("scored", 0),
            **{f: (scores or {}).get(src, {}).get(f) for f in SCORE_FIELDS},
        }
        tox = profile["sources"].get(src, {})
        row["toxicity_scored"] = tox.get("toxicity_scored", 0)
        row["toxicity_over"] = tox.get("toxicity_over", 0)
        row["heuristic_dropped"] = sum(n for r, n in row["drop_reasons"].items() if r in HEURISTIC_REASONS)
        row["kept_share"] = _share(row["kept"], n_in)
        row["toxicity_over_share"] = _share(row["toxicity_over"], row["toxicity_scored"])
        row["heuristic_drop_share"] = _share(row["heuristic_dropped"], n_in)
        if row["docs"] != row["kept"] + row["dropped"] + row["quarantined"]:
            problems.append(f"{src}: input {row['docs']} != kept {row['kept']} + dropped {row['dropped']} "
                            f"+ quarantined {row['quarantined']}")
        totals["input"] += row["docs"]
        totals["kept"] += row["kept"]
        totals["dropped"] += row["dropped"]
        totals["quarantined"] += row["quarantined"]
        for r, n in row["drop_reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
        for r, n in row["quarantine_reasons"].items():
            quarantine_reasons[r] = quarantine_reasons.get(r, 0) + n
        shards.append(row)
    if totals["input"] != totals["kept"] + totals["dropped"] + totals["quarantined"]:
        problems.append(f"total: input {totals['input']} != kept + dropped + quarantined")

    good = totals["input"] - totals["quarantined"]
    n_exact = sum(o.get("exact_duplicates", 0) for o in output.values())
    n_near = sum(o.get("near_duplicates", 0) for o in output.values())
    step_rows = [{"name": "parse", "seconds": round(phases.get("parse_and_score", 0.0), 3), "docs_in": totals["input"],
                  "docs_out": good, "note": "wall time of the whole streaming pass 1"}]
    # Document counts come from the accounting, not from the workers' sums: a task Ray ran again after losing
    # a node reports its batches twice. Seconds are summed worker time, retries included.
    for name in ("normalize", "heuristics", "exact_hash", "minhash"):
        if name in steps:
            step_rows.append({"name": name, "seconds": round(steps[name], 3), "docs_in": good, "docs_out": good,
                              "note": "summed worker time"})
    step_rows.append({"name": "dedup_buckets", "seconds": round(phases.get("buckets", 0.0), 3), "docs_in": good,
                      "docs_out": good, "note": "Ray Data groupby of exact and band keys (wall)"})
    step_rows.append({"name": "exact_dedup", "seconds": 0.0, "docs_in": good, "docs_out": good - n_exact,
                      "note": "decided in the bucket shuffle"})
    step_rows.append({"name": "near_dedup", "seconds": round(phases.get("dedup_graph", 0.0), 3), "docs_in": good,
                      "docs_out": good - n_near, "note": "verification + connected components (wall)"})
    if "decide" in steps:
        decided = sum(n for r, n in reasons.items() if r in HEURISTIC_REASONS or r in ("exact_duplicate", "near_duplicate"))
        step_rows.append({"name": "decide", "seconds": round(steps["decide"], 3), "docs_in": good,
                          "docs_out": good - decided, "note": "summed worker time; docs_out: kept by dedup + heuristics"})
    if "score" in phases:
        n_scored = sum(v.get("scored", 0) for v in (scores or {}).values())
        step_rows.append({"name": "score", "seconds": round(phases["score"], 3), "docs_in": good, "docs_out": n_scored,
                          "note": "tokenize + perplexity + toxicity actors (wall); docs_out = documents scored"})
    step_rows.append({"name": "write", "seconds": round(phases.get("decide_and_write", 0.0), 3), "docs_in": good,
                      "docs_out": totals["kept"], "note": "wall time of the streaming pass 4"})

    return {
        "output": out_dir,
        "counts": totals,
        "drop_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "quarantine_reasons": dict(sorted(quarantine_reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "dedup": {"exact_duplicates": n_exact, "near_duplicates": n_near, **graph, **lsh},
        "shards": shards,
        "steps": step_rows,
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
        "histograms": {
            "perplexity": {"log10_edges": PPL_LOG10_EDGES.tolist(), **profile["hist"]["perplexity"]},
            "toxicity": {"edges": TOX_EDGES.tolist(), **profile["hist"]["toxicity"]}},
        "thresholds": {"max_perplexity": cfg.decide.max_perplexity, "max_nll_percentile": cfg.decide.max_nll_percentile,
                       "max_toxicity": cfg.decide.toxicity_threshold(toxicity.get("backend")),
                       "toxicity_backend": toxicity.get("backend"), "max_toxicity_by_backend": cfg.decide.max_toxicity},
        "samples": {**{r: v for r, v in profile["samples"].items() if r not in (duplicate_samples or {})},
                    **(duplicate_samples or {})},
        "toxicity": toxicity,
        "perplexity": {"available": cfg.perplexity.enabled,
                       "reason": "ok" if cfg.perplexity.enabled else "perplexity.enabled is false",
                       "model": cfg.perplexity.model if cfg.perplexity.enabled else None},
        "accounting": {"ok": not problems, "message": "; ".join(problems) if problems else "input == kept + dropped + quarantined"},
        "config": to_dict(cfg),
        "versions": versions(),
    }


def write_report(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
    from app.dashboard.render import render_page

    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render_page([report]))
