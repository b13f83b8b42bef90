"""The data-quality dashboard: one self-contained HTML page (Plotly, JS inlined) from report.json alone.

    render_page([report])            one run (what every refine run writes as report.html)
    render_page([before, after])     runs side by side

Sections per run: counts; the shard heatmap (shards x signals, colour scaled per column, hover shows the
number, a menu sorts the rows by any column); perplexity and toxicity histograms, kept vs dropped, with
the drop thresholds drawn (toxicity: the threshold, title and axis of the backend that scored); drop reasons;
the worst shards; sample documents per drop reason, duplicates beside the document they matched.

Large runs: with more shards than ``report.heatmap_rows`` (default 100), consecutive shards (in source
order) are aggregated into that many groups; sums for counts, document-weighted means for ratios, and
scored-weighted means of the shards' perplexity quantiles (a group's "p50" is the mean of its shards'
medians, not the median of its documents). The worst-shards table always lists single shards (20).
The page's size is then bounded whatever the shard count: Plotly's JS (about 4.8 MB) plus about 0.1 MB
per run (tested at 10,000 shards).
"""

from __future__ import annotations

import html
import math
import os
from typing import Any, Optional

SIGNALS: list[tuple[str, str, str]] = [  # key, column title, number format
    ("docs", "documents", "int"),
    ("kept_share", "kept %", "pct"),
    ("exact_dup_ratio", "exact-dup ratio", "pct"),
    ("near_dup_ratio", "near-dup ratio", "pct"),
    ("perplexity_p50", "perplexity p50", "num"),
    ("perplexity_p90", "perplexity p90", "num"),
    ("toxicity_mean", "toxicity mean", "num"),
    ("toxicity_over_share", "toxicity > threshold", "pct"),
    ("heuristic_drop_share", "heuristic drops", "pct"),
]
WORST = 20
DEFAULT_ROWS = 100


def fmt(value: Optional[float], kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def _short_names(sources: list[str]) -> list[str]:
    """Sources without their common directory (still unique, since sources are); works for URIs too."""
    dirs = [x[: x.rfind("/") + 1] for x in sources]
    common = os.path.commonprefix(dirs) if dirs else ""
    cut = common.rfind("/") + 1
    return [x[cut:] or x for x in sources]


def _wmean(pairs) -> Optional[float]:
    pairs = [(v, w) for v, w in pairs if v is not None and w]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def aggregate(shards: list[dict], max_rows: int) -> list[dict]:
    """Heatmap rows: one per shard, or ``max_rows`` groups of consecutive shards (``label``, ``members``, signals)."""
    shards = sorted(shards, key=lambda r: r["source"])
    names = _short_names([r["source"] for r in shards])
    if len(shards) <= max_rows:
        return [{"label": n, "title": r["source"], "members": 1, **{k: r.get(k) for k, _, _ in SIGNALS}}
                for n, r in zip(names, shards)]
    size = -(-len(shards) // max_rows)
    rows = []
    for lo in range(0, len(shards), size):
        g, gn = shards[lo:lo + size], names[lo:lo + size]
        docs = sum(r["docs"] for r in g)
        tox_scored = sum(r.get("toxicity_scored", 0) for r in g)
        rows.append({
            "label": f"{lo + 1}-{lo + len(g)}: {gn[0]} .. {gn[-1]}", "title": f"{len(g)} shards", "members": len(g),
            "docs": docs,
            "kept_share": sum(r["kept"] for r in g) / docs if docs else None,
            "exact_dup_ratio": _wmean((r["exact_dup_ratio"], r["docs"]) for r in g),
            "near_dup_ratio": _wmean((r["near_dup_ratio"], r["docs"]) for r in g),
            "perplexity_p50": _wmean((r.get("perplexity_p50"), r.get("scored", 0)) for r in g),
            "perplexity_p90": _wmean((r.get("perplexity_p90"), r.get("scored", 0)) for r in g),
            "toxicity_mean": _wmean((r.get("toxicity_mean"), r.get("toxicity_scored", 0)) for r in g),
            "toxicity_over_share": sum(r.get("toxicity_over", 0) for r in g) / tox_scored if tox_scored else None,
            "heuristic_drop_share": sum(r.get("heuristic_dropped", 0) for r in g) / docs if docs else None,
        })
    return rows


def _scaled(rows: list[dict]) -> list[list[Optional[float]]]:
    """z: each column min-max scaled to [0, 1] over the rows (constant columns: 0.5; missing: None)."""
    cols = []
    for key, _, _ in SIGNALS:
        vals = [r[key] for r in rows]
        real = [v for v in vals if v is not None]
        lo, hi = (min(real), max(real)) if real else (0.0, 0.0)
        cols.append([None if v is None else (0.5 if hi == lo else (v - lo) / (hi - lo)) for v in vals])
    return [list(r) for r in zip(*cols)]


def heatmap_figure(report: dict, max_rows: int):
    import plotly.graph_objects as go

    rows = aggregate(report["shards"], max_rows)
    titles = [t for _, t, _ in SIGNALS]
    z = _scaled(rows)
    text = [[fmt(r[k], kind) for k, _, kind in SIGNALS] for r in rows]
    labels = [r["label"] for r in rows]
    hover = "<b>%{y}</b><br>%{x}: %{text}<extra></extra>"
    fig = go.Figure(go.Heatmap(z=z, x=titles, y=labels, text=text, hovertemplate=hover, colorscale="Viridis",
                               texttemplate="%{text}", textfont={"size": 10},
                               zmin=0, zmax=1, xgap=1, ygap=1, showscale=True,
                               colorbar={"title": {"text": "per column"}, "tickvals": [0, 1], "ticktext": ["low", "high"]}))

    def order(key: Optional[str]) -> list[int]:
        idx = list(range(len(rows)))
        if key is None:
            return idx
        return sorted(idx, key=lambda i: (rows[i][key] is None, -(rows[i][key] or 0)))

    buttons = []
    for key, title in [(None, "source order")] + [(k, t) for k, t, _ in SIGNALS]:
        o = order(key)
        buttons.append({"label": f"sort: {title}", "method": "restyle",
                        "args": [{"z": [[z[i] for i in o]], "text": [[text[i] for i in o]], "y": [[labels[i] for i in o]]}]})
    grouped = len(rows) < len(report["shards"])
    fig.update_layout(
        title={"text": f"Shards x signals ({len(report['shards']):,} shards"
                       + (f" in {len(rows)} groups of consecutive shards)" if grouped else ")")},
        height=max(320, 150 + 20 * len(rows)), margin={"l": 10, "r": 10, "t": 90, "b": 10},
        yaxis={"autorange": "reversed", "automargin": True, "type": "category"},
        xaxis={"side": "top", "automargin": True},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom",
                      "pad": {"b": 40}}])
    return fig, rows


def _threshold(fig, x: float, label: str) -> None:
    fig.add_vline(x=x, line={"color": "crimson", "dash": "dash"}, annotation_text=label, annotation_position="top")


def histogram_figure(report: dict, name: str):
    """Kept vs dropped histogram of perplexity (log axis) or toxicity, thresholds drawn."""
    import plotly.graph_objects as go

    h = report.get("histograms", {}).get(name, {})
    log = name == "perplexity"
    edges = h.get("log10_edges" if log else "edges", [])
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = (edges[1] - edges[0]) if len(edges) > 1 else 1
    fig = go.Figure()
    for side, colour in (("kept", "#2a9d8f"), ("dropped", "#e76f51")):
        counts = h.get(side, [])
        fig.add_trace(go.Bar(x=centers, y=counts, width=width, name=side, marker_color=colour, opacity=0.75,
                             hovertemplate=f"{side}: %{{y}} documents<extra></extra>"))
    total = sum(sum(h.get(s, [])) for s in ("kept", "dropped"))
    info = report.get(name, {})
    title = "Perplexity (log scale)" if log else "Toxicity"
    backend = info.get("backend") if not log else None
    if backend:  # two toxicity models, two scales: the page says which one scored
        title += f": {backend}"
    if total == 0:
        why = "unavailable (see above)" if not info.get("available", True) else "no document was scored"
        fig.add_annotation(text=f"{name}: {why}", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    t = report.get("thresholds", {})
    if log:
        ticks = list(range(0, int(edges[-1]) + 1)) if edges else []
        fig.update_xaxes(tickvals=ticks, ticktext=[f"{10 ** k:,}" for k in ticks], title="perplexity")
        if t.get("max_perplexity"):
            _threshold(fig, math.log10(t["max_perplexity"]), f"max_perplexity {t['max_perplexity']:g}")
        if t.get("max_nll_percentile") is not None:
            title += f"; also dropped above the {t['max_nll_percentile']:.0%} NLL percentile of each source"
    else:
        what = {"detoxify": "max over labels and chunks", "profanity_check": "P(offensive), max over chunks"}
        fig.update_xaxes(title=f"toxicity ({what.get(backend, 'max over labels')})", range=[0, 1])
        if t.get("max_toxicity") is not None:
            label = f"max_toxicity {t['max_toxicity']:g}" + (f" ({backend})" if backend else "")
            _threshold(fig, t["max_toxicity"], label)
    fig.update_layout(title={"text": title}, barmode="overlay", height=340, margin={"l": 10, "r": 10, "t": 60, "b": 10},
                      yaxis={"title": "documents", "automargin": True}, legend={"orientation": "h", "y": -0.25})
    return fig


def reasons_figure(report: dict):
    import plotly.graph_objects as go

    items = sorted(report.get("drop_reasons", {}).items(), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[k for k, _ in items], orientation="h", marker_color="#e76f51",
                           hovertemplate="%{y}: %{x} documents<extra></extra>"))
    fig.update_layout(title={"text": "Drop reasons (first reason per document)"}, height=max(260, 80 + 24 * len(items)),
                      margin={"l": 10, "r": 10, "t": 50, "b": 10}, yaxis={"automargin": True, "type": "category"},
                      xaxis={"title": "documents"})
    if not items:
        fig.add_annotation(text="no document was dropped", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


def _table(header: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def worst_shards(report: dict, n: int = WORST) -> list[dict]:
    """The shards that lose the largest share of their documents (dropped + quarantined)."""
    def loss(r):
        return (r["dropped"] + r["quarantined"]) / r["docs"] if r["docs"] else 0.0

    return sorted(report["shards"], key=lambda r: (-loss(r), -r["docs"], r["source"]))[:n]


def _worst_table(report: dict) -> str:
    rows = []
    for r in worst_shards(report):
        top = max(r["drop_reasons"].items(), key=lambda kv: kv[1])[0] if r["drop_reasons"] else ""
        rows.append([r["source"], fmt(r["docs"], "int"), fmt(r.get("kept_share"), "pct"),
                     fmt(r["dropped"], "int"), fmt(r["quarantined"], "int"), fmt(r["exact_dup_ratio"], "pct"),
                     fmt(r["near_dup_ratio"], "pct"), fmt(r.get("perplexity_p50"), "num"),
                     fmt(r.get("toxicity_mean"), "num"), top])
    return _table(["shard", "documents", "kept %", "dropped", "quarantined", "exact dup", "near dup", "perplexity p50",
                   "toxicity mean", "top drop reason"], rows, "worst")


def _doc(d: dict) -> str:
    bits = [f"id {d.get('id')}", os.path.basename(str(d.get("source", "")))]
    for key, kind in (("perplexity", "num"), ("toxicity", "num"), ("quality_score", "num"), ("similarity", "num")):
        if d.get(key) is not None:
            bits.append(f"{key} {fmt(d[key], kind)}")
    return (f'<div class="meta">{html.escape(" · ".join(bits))}</div>'
            f'<pre>{html.escape(d.get("text") or "")}</pre>')


def _samples(report: dict) -> str:
    out = []
    counts = report.get("drop_reasons", {})
    for reason in sorted(report.get("samples", {}), key=lambda r: -counts.get(r, 0)):
        docs = report["samples"][reason]
        items = []
        for d in docs:
            m = d.get("matched")
            if m:
                items.append(f'<div class="pair"><div><h4>duplicate</h4>{_doc(d)}</div>'
                             f'<div><h4>matched ({html.escape(m.get("drop_reason") or "kept")})</h4>{_doc(m)}</div></div>')
            else:
                items.append(f'<div class="sample">{_doc(d)}</div>')
        out.append(f'<details><summary>{html.escape(reason)} ({counts.get(reason, 0):,} documents; '
                   f'{len(docs)} shown)</summary>{"".join(items)}</details>')
    return "".join(out) or "<p>No document was dropped.</p>"


def _fig_html(fig, div_id: str, modebar: bool = True) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True, "displayModeBar": modebar})


def _availability(info: dict) -> str:
    if not info.get("available"):
        return f"unavailable ({info.get('reason')})"
    what = ": ".join(str(x) for x in (info.get("backend"), info.get("model")) if x)  # toxicity: which backend scored
    return f"available ({what})" if what else "available"


def run_section(report: dict, i: int, title: str) -> str:
    c = report["counts"]
    max_rows = report.get("config", {}).get("report", {}).get("heatmap_rows", DEFAULT_ROWS)
    heat, _ = heatmap_figure(report, max_rows)
    acc = report["accounting"]
    avail = [f"{n}: {_availability(report.get(n, {}))}" for n in ("perplexity", "toxicity")]
    summary = (f'<p class="counts" data-run="{i}">input <b>{c["input"]:,}</b> · kept <b>{c["kept"]:,}</b> · '
               f'dropped <b>{c["dropped"]:,}</b> · quarantined <b>{c["quarantined"]:,}</b> · accounting '
               f'{"ok" if acc["ok"] else "FAILED"}: {html.escape(acc["message"])}</p>'
               f'<p class="avail">{html.escape(" · ".join(avail))}</p>')
    return (f'<section class="run" id="run-{i}"><h2>{html.escape(title)}</h2>'
            f'<p class="path">{html.escape(report.get("output", ""))}</p>{summary}'
            f'{_fig_html(heat, f"heatmap-{i}", modebar=False)}'
            f'<div class="two">{_fig_html(histogram_figure(report, "perplexity"), f"hist-perplexity-{i}")}'
            f'{_fig_html(histogram_figure(report, "toxicity"), f"hist-toxicity-{i}")}</div>'
            f'{_fig_html(reasons_figure(report), f"reasons-{i}")}'
            f'<h3>Worst shards (largest share dropped or quarantined)</h3>{_worst_table(report)}'
            f'<h3>Sample documents per drop reason</h3>{_samples(report)}</section>')


CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}h1{margin:0 0 .3em}
.runs{display:grid;gap:1.5em}.runs.n2{grid-template-columns:1fr 1fr}.runs.n3{grid-template-columns:1fr 1fr 1fr}
.run{min-width:0}.path{color:#666;font-size:.85em;word-break:break-all}.two{display:grid;grid-template-columns:1fr 1fr;gap:.5em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;width:100%}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f4f4f4}td:first-child{word-break:break-all}details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
pre{white-space:pre-wrap;background:#f8f8f8;border:1px solid #eee;padding:.5em;max-height:14em;overflow:auto;font-size:.8em}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.5em}.meta{color:#555;font-size:.8em}h4{margin:.3em 0}"""


def render_page(reports: list[dict], titles: Optional[list[str]] = None) -> str:
    """The whole page for one or more runs (side by side), self-contained and offline."""
    from plotly.offline import get_plotlyjs

    titles = titles or ([f"run {i + 1}" for i in range(len(reports))] if len(reports) > 1 else ["refine run"])
    sections = "".join(run_section(r, i, t) for i, (r, t) in enumerate(zip(reports, titles)))
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>Distillery data-quality dashboard</title>'
            f'<link rel="icon" href="data:,"><style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>'
            f'<h1>Data-quality dashboard</h1><div class="runs n{min(len(reports), 3)}">{sections}</div></body></html>')


def page_data(page: str, div_id: str) -> list[dict[str, Any]]:
    """The Plotly traces a page draws into ``div_id`` (for tests and tools reading a page back)."""
    import json
    import re

    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    if not m:
        raise KeyError(div_id)
    data, _ = json.JSONDecoder().raw_decode(page, m.end())
    return data
