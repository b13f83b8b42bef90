"""report.json: counts, drop reasons, one row per shard, one row per step, config, versions; the accounting check.

``report.html`` here is a plain static summary rendered from report.json; the data-quality dashboard
(``app/dashboard``) replaces it when it lands.
"""

from __future__ import annotations

import html
import json
import os
import platform
from importlib import metadata

from app.config import to_dict


class AccountingError(RuntimeError):
    """input != kept + dropped + quarantined (in total or for some shard)."""


VERSIONED = ["distillery", "ray", "pyarrow", "numpy", "numba", "datasketch", "pandas", "torch", "transformers"]


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


def build_report(*, files, cfg, ingest: dict, output: dict, steps: dict, graph: dict, phases: dict, lsh: dict,
                 out_dir: str, scores: dict | None = None, toxicity: tuple[bool, str] = (False, "toxicity.enabled is false")) -> dict:
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
    for name in ("normalize", "heuristics", "exact_hash", "minhash"):
        if name in steps:
            s = steps[name]
            step_rows.append({"name": name, "seconds": round(s["seconds"], 3), "docs_in": s["docs_in"], "docs_out": s["docs_out"],
                              "note": "summed worker time"})
    step_rows.append({"name": "dedup_buckets", "seconds": round(phases.get("buckets", 0.0), 3), "docs_in": good,
                      "docs_out": good, "note": "Ray Data groupby of exact and band keys (wall)"})
    step_rows.append({"name": "exact_dedup", "seconds": 0.0, "docs_in": good, "docs_out": good - n_exact,
                      "note": "decided in the bucket shuffle"})
    step_rows.append({"name": "near_dedup", "seconds": round(phases.get("dedup_graph", 0.0), 3), "docs_in": good,
                      "docs_out": good - n_near, "note": "verification + connected components (wall)"})
    if "decide" in steps:
        s = steps["decide"]
        step_rows.append({"name": "decide", "seconds": round(s["seconds"], 3), "docs_in": s["docs_in"],
                          "docs_out": s["docs_out"], "note": "summed worker time"})
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
        "toxicity": {"available": toxicity[0], "reason": toxicity[1]},
        "perplexity": {"available": cfg.perplexity.enabled,
                       "reason": "ok" if cfg.perplexity.enabled else "perplexity.enabled is false",
                       "model": cfg.perplexity.model if cfg.perplexity.enabled else None},
        "accounting": {"ok": not problems, "message": "; ".join(problems) if problems else "input == kept + dropped + quarantined"},
        "config": to_dict(cfg),
        "versions": versions(),
    }


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in v.items())
    return "" if v is None else str(v)


def render_html(report: dict) -> str:
    c = report["counts"]
    reasons = [{"reason": k, "documents": v} for k, v in report["drop_reasons"].items()]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Distillery refine report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#f4f4f4}}</style></head><body>
<h1>Refine report</h1><p>{html.escape(report['output'])}</p>
<p>input {c['input']} &middot; kept {c['kept']} &middot; dropped {c['dropped']} &middot; quarantined {c['quarantined']}
&middot; accounting: {html.escape(report['accounting']['message'])}</p>
<h2>Drop reasons</h2>{_table(reasons, ['reason', 'documents'])}
<h2>Shards</h2>{_table(report['shards'], ['source', 'docs', 'kept', 'dropped', 'quarantined', 'exact_dup_ratio', 'near_dup_ratio',
                                           'perplexity_p50', 'perplexity_p90', 'toxicity_p90'])}
<h2>Steps</h2>{_table(report['steps'], ['name', 'seconds', 'docs_in', 'docs_out', 'note'])}
</body></html>"""


def write_report(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render_html(report))
