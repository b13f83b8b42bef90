"""A runs table -> both Chinchilla fits, compute-optimal sizes with intervals, and a report (JSON, PNG, HTML).

The table (Parquet or CSV) has one row per training run. Columns are matched by name, ignoring case,
spaces and punctuation:
    N      params, parameters, model size, n_params          model parameters
    D      tokens, training tokens, n_tokens                 training tokens
    FLOPs  flops, flop, training flop(s), compute, c         training compute
    loss   loss, final loss, eval loss, l                    final (held-out) loss
    budget optional: the IsoFLOP profile a run belongs to    (default: runs grouped by FLOPs)
A table with N, FLOPs and loss but no D is accepted: D = FLOPs / (6 N). One with N, D and loss but no FLOPs
gets FLOPs = 6 N D.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
from typing import Optional, Sequence

import numpy as np

from app.scaling.chinchilla import (ParametricFit, bootstrap_isoflop, bootstrap_parametric,
                                    fit_isoflop, fit_parametric, interval)

log = logging.getLogger(__name__)

ALIASES = {
    "N": ("n", "params", "parameters", "modelsize", "nparams", "numparams", "size", "nonembeddingparams"),
    "D": ("d", "tokens", "trainingtokens", "ntokens", "numtokens", "data"),
    "FLOPs": ("flops", "flop", "trainingflop", "trainingflops", "compute", "c"),
    "loss": ("loss", "finalloss", "evalloss", "l"),
    "budget": ("budget", "isoflop", "profile"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_runs(path: str) -> dict:
    """The runs table at ``path`` (.parquet or .csv) as {"N", "D", "FLOPs", "loss"[, "budget"]: arrays}."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    table = pcsv.read_csv(path) if path.lower().endswith(".csv") else pq.read_table(path)
    return runs_from_columns({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, path)


def runs_from_columns(cols: dict, where: str = "the table") -> dict:
    names = {_norm(c): c for c in cols}
    out = {}
    for key, aliases in ALIASES.items():
        hit = next((names[a] for a in aliases if a in names), None)
        if hit is not None:
            out[key] = np.asarray(cols[hit]) if key == "budget" else np.asarray(cols[hit], dtype=float)
    if "N" not in out or "loss" not in out or ("D" not in out and "FLOPs" not in out):
        raise ValueError(f"{where}: needs model size, loss and tokens or FLOPs columns; has {sorted(cols)} "
                         f"(names accepted: {ALIASES})")
    if "D" not in out:
        out["D"] = out["FLOPs"] / (6.0 * out["N"])
    if "FLOPs" not in out:
        out["FLOPs"] = 6.0 * out["N"] * out["D"]
    keep = np.isfinite(out["N"]) & np.isfinite(out["D"]) & np.isfinite(out["loss"]) & (out["loss"] > 0)
    if not keep.all():
        log.warning("%s: %d of %d runs without a finite loss are left out", where, int((~keep).sum()), len(keep))
        out = {k: v[keep] for k, v in out.items()}
    return out


def _ci(values, level):
    lo, hi = interval(values, level)
    return [lo, hi]


def analyze(runs: dict, targets: Sequence[float], *, bootstrap: int = 100, level: float = 0.95, seed: int = 0,
            workers: Optional[int] = None, grid: Optional[dict] = None, top_inits: Optional[int] = None) -> dict:
    """Both fits on ``runs``; N*, D*, tokens per parameter and predicted loss at each target budget, with
    bootstrap intervals (``bootstrap`` resamples; 0: none). ``top_inits``: start the Approach 3 fit from only
    the best grid points (None: all of them, as the paper)."""
    n, d, c, loss = runs["N"], runs["D"], runs["FLOPs"], runs["loss"]
    out: dict = {"runs": int(len(n)), "level": level, "targets": [float(t) for t in targets]}
    p3: Optional[ParametricFit] = None
    if len(n) >= 5:
        p3 = fit_parametric(n, d, loss, grid=grid, workers=workers, top_inits=top_inits)
        boots = bootstrap_parametric(n, d, loss, samples=bootstrap, seed=seed, grid=grid, fit=p3,
                                     workers=workers) if bootstrap else []
        out["approach3"] = {
            "fit": p3.to_dict(),
            "intervals": {k: _ci([getattr(b, k) for b in boots], level) for k in ("E", "A", "B", "alpha", "beta")},
            "bootstrap_samples": len(boots),
            "optimal": [dict(p3.optimal(t), intervals={k: _ci([b.optimal(t)[k] for b in boots], level)
                                                       for k in ("N", "D", "tokens_per_param", "loss")})
                        for t in targets],
        }
    else:
        out["approach3"] = {"skipped": f"needs at least 5 runs, got {len(n)}"}
    p2 = fit_isoflop(n, d, c, loss, runs.get("budget"))
    out["approach2"] = {"fit": p2.to_dict()}
    if math.isfinite(p2.n_exponent):
        boots2 = bootstrap_isoflop(n, d, c, loss, runs.get("budget"), samples=bootstrap * 10, seed=seed) if bootstrap else []
        out["approach2"].update({
            "intervals": {"n_exponent": _ci([b.n_exponent for b in boots2], level),
                          "d_exponent": _ci([b.d_exponent for b in boots2], level)},
            "bootstrap_samples": len(boots2),
            "optimal": [dict(p2.optimal(t), intervals={k: _ci([b.optimal(t)[k] for b in boots2], level)
                                                       for k in ("N", "D", "tokens_per_param")}) for t in targets],
        })
    else:
        used = sum(p.used for p in p2.profiles)
        out["approach2"]["skipped"] = f"needs 2 IsoFLOP profiles with a minimum, got {used}"
    out["_fits"] = (p3, p2)  # for plotting; dropped from the JSON
    return out


def summary_lines(result: dict) -> list[str]:
    """Human-readable N*, D* per target budget and approach."""
    lines = []
    for name in ("approach3", "approach2"):
        a = result[name]
        if "optimal" not in a:
            lines.append(f"{name}: {a.get('skipped', 'no fit')}")
            continue
        if name == "approach3":
            f = a["fit"]
            lines.append(f"{name}: L(N, D) = {f['E']:.4g} + {f['A']:.4g}/N^{f['alpha']:.4g} + {f['B']:.4g}/D^{f['beta']:.4g}"
                         f"  ({result['runs']} runs, {a['bootstrap_samples']} bootstrap fits)")
        else:
            f = a["fit"]
            lines.append(f"{name}: N_opt ∝ C^{f['n_exponent']:.3f}, D_opt ∝ C^{f['d_exponent']:.3f}"
                         f"  ({sum(p['used'] for p in f['profiles'])} IsoFLOP profiles)")
        pct = int(round(result["level"] * 100))
        for o in a["optimal"]:
            ci = o["intervals"]
            lines.append(f"  C = {o['flops']:.3g}: N* = {o['N']:.4g} [{ci['N'][0]:.4g}, {ci['N'][1]:.4g}]  "
                         f"D* = {o['D']:.4g} [{ci['D'][0]:.4g}, {ci['D'][1]:.4g}]  "
                         f"D*/N* = {o['tokens_per_param']:.3g}" + (f"  loss {o['loss']:.4g}" if "loss" in o else "")
                         + f"   ({pct}% intervals)")
    return lines


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(runs: dict, result: dict) -> dict:
    """{"isoflop.png", "optimal.png", "parametric.png"}: PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p3, p2 = result["_fits"]
    out = {}
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    profiles = p2.profiles
    for k, p in enumerate(profiles):
        col = cmap(k / max(1, len(profiles) - 1))
        ax.scatter(p.n, p.loss, color=col, s=18, label=f"C = {p.flops:.2g}")
        if p.parabola:
            x = np.linspace(math.log(min(p.n)) - 0.3, math.log(max(p.n)) + 0.3, 100)
            ax.plot(np.exp(x), np.polyval(p.parabola, x), color=col, lw=1)
        if p.used:
            ax.scatter([p.n_opt], [p.loss_opt], color=col, marker="*", s=90, edgecolor="k", linewidth=0.5)
    ax.set_xscale("log")
    ax.set(xlabel="parameters N", ylabel="final loss", title="IsoFLOP profiles (Approach 2)")
    ax.legend(fontsize=7)
    out["isoflop.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    cs = np.array(sorted({*result["targets"], *[p.flops for p in profiles]}))
    grid = np.geomspace(cs.min() / 3, cs.max() * 3, 50)
    for ax, key, label in ((axes[0], "N", "N_opt"), (axes[1], "D", "D_opt")):
        used = [p for p in profiles if p.used]
        ax.scatter([p.flops for p in used], [p.n_opt if key == "N" else p.d_opt for p in used], color="C0",
                   label="IsoFLOP minima")
        if math.isfinite(p2.n_exponent):
            ax.plot(grid, [p2.optimal(c)[key] for c in grid], color="C0", lw=1, label="Approach 2")
        if p3 is not None:
            ax.plot(grid, [p3.optimal(c)[key] for c in grid], color="C3", lw=1, ls="--", label="Approach 3")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="training FLOPs C", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("Compute-optimal allocation")
    out["optimal.png"] = _png(fig)
    plt.close(fig)

    if p3 is not None:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        pred = p3.predict(runs["N"], runs["D"])
        ax.scatter(runs["loss"], pred, s=14)
        lo, hi = float(min(runs["loss"].min(), pred.min())), float(max(runs["loss"].max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set(xlabel="observed loss", ylabel="L(N, D) fitted", title="Approach 3 fit")
        out["parametric.png"] = _png(fig)
        plt.close(fig)
    return out


def write_report(runs: dict, result: dict, out_dir: str) -> dict:
    """scaling.json, the PNGs and report.html (PNGs inlined) in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = {k: v for k, v in result.items() if not k.startswith("_")}
    paths = {"json": os.path.join(out_dir, "scaling.json"), "html": os.path.join(out_dir, "report.html")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1, default=float)
    images = plots(runs, result)
    for name, png in images.items():
        paths[name] = os.path.join(out_dir, name)
        with open(paths[name], "wb") as f:
            f.write(png)
    rows = "".join(f"<tr><td>{n:.4g}</td><td>{d:.4g}</td><td>{c:.4g}</td><td>{l:.4f}</td></tr>"
                   for n, d, c, l in zip(runs["N"], runs["D"], runs["FLOPs"], runs["loss"]))
    imgs = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                   f"<figcaption>{name}</figcaption></figure>" for name, png in images.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Scaling fit</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td,th{{padding:2px 8px;text-align:right}}
pre{{background:#f4f4f4;padding:1em}} figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>Chinchilla scaling fit</h1><pre>{html.escape(chr(10).join(summary_lines(result)))}</pre>{imgs}
<h2>Runs</h2><table><tr><th>N</th><th>D</th><th>FLOPs</th><th>loss</th></tr>{rows}</table></body></html>"""
    with open(paths["html"], "w") as f:
        f.write(page)
    return paths
