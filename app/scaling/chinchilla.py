"""Chinchilla scaling laws: the parametric fit (Approach 3), IsoFLOP profiles (Approach 2), compute-optimal sizes.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Sec. 3.2, 3.3, Appendix D.2):

Approach 3 models the final loss of a model of N parameters trained on D tokens as
    L(N, D) = E + A / N^α + B / D^β
and fits it by minimising, over (a, b, e, α, β) with A = exp(a), B = exp(b), E = exp(e),
    Σ_runs  Huber_δ( LSE(a − α log N_i,  b − β log D_i,  e) − log L_i ),     δ = 1e-3
with L-BFGS started from every point of a grid (α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1},
a, b ∈ {0, 5, …, 25}), keeping the best local minimum. LSE is log-sum-exp, so the model is fitted on the
log of the loss. Under the constraint C = 6 N D the loss is smallest at
    N*(C) = G (C/6)^a',  D*(C) = G⁻¹ (C/6)^b',  G = (α A / (β B))^(1/(α+β)),  a' = β/(α+β),  b' = α/(α+β).
Confidence intervals come from the bootstrap: the runs are resampled with replacement and refitted.

Approach 2 fits, for each compute budget C (an IsoFLOP profile), a parabola of the final loss in log N; its
vertex is N_opt(C). D_opt(C) is read off the profile's own N–D relation (a straight line in log–log), so it
follows the table's FLOP accounting (exact or 6ND). Power laws N_opt = k_N C^a and D_opt = k_D C^b are then
fitted to the vertices (least squares in log–log). Intervals: the bootstrap, resampling runs within each
budget.

Implemented as the paper states it, with scipy's L-BFGS-B (no bounds) and an analytic gradient. The
tolerances are tight (``ftol``, ``gtol`` near machine precision): the Huber objective with δ = 1e-3 is small
and flat, and loose tolerances stop early, far from the minimum (Besiroglu et al. 2024 point out that the
published Chinchilla estimates are not a minimum of the stated objective on the paper's data).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

HUBER_DELTA = 1e-3
CHINCHILLA_GRID = {  # Hoffmann et al. 2022, Appendix D.2
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
_ORDER = ("a", "b", "e", "alpha", "beta")  # theta
LBFGS_OPTIONS = {"maxiter": 10_000, "maxfun": 20_000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20}


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """The Approach 3 objective at theta = (a, b, e, α, β) and its gradient."""
    a, b, e, alpha, beta = theta
    z0 = a - alpha * log_n  # (runs,)
    z1 = b - beta * log_d
    m = np.maximum(np.maximum(z0, z1), e)
    e0, e1, e2 = np.exp(z0 - m), np.exp(z1 - m), np.exp(e - m)
    s = e0 + e1 + e2
    r = m + np.log(s) - log_l  # residual of log L: LSE(z0, z1, e) - log L
    ar = np.abs(r)
    value = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    q = np.clip(r, -delta, delta) / s  # Huber'(r) * softmax / exp(z - m)
    q0, q1 = q * e0, q * e1
    grad = np.array([q0.sum(), q1.sum(), (q * e2).sum(), -(q0 @ log_n), -(q1 @ log_d)])
    return float(value), grad


def objective_batch(thetas: np.ndarray, log_n, log_d, log_l, delta: float = HUBER_DELTA) -> np.ndarray:
    """The objective at many thetas (K, 5) at once (to rank grid points)."""
    a, b, e, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
    z = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(thetas), len(log_n)))])
    r = np.logaddexp.reduce(z, axis=0) - log_l
    return huber(r, delta).sum(axis=1)


@dataclass
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")
    runs: int = 0
    inits: int = 0

    @property
    def theta(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.array([*np.log([self.A, self.B, self.E]), self.alpha, self.beta])

    def predict(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        with np.errstate(all="ignore"):
            return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def optimal(self, flops: float) -> dict:
        """N*, D* minimising L under C = 6 N D; tokens per parameter and the predicted loss."""
        s = self.alpha + self.beta
        with np.errstate(all="ignore"):  # a degenerate fit gives nan/inf here, which intervals leave out
            g = np.float64(self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
            n = float(g * np.float64(flops / 6.0) ** (self.beta / s))
            d = float(np.float64(flops / 6.0) ** (self.alpha / s) / g)
            if not (0 < n < math.inf and 0 < d < math.inf):
                n = d = float("nan")
            return {"flops": flops, "N": n, "D": d, "tokens_per_param": d / n, "loss": float(self.predict(n, d))}

    def to_dict(self) -> dict:
        return asdict(self)


def _grid(grid: Optional[dict]) -> np.ndarray:
    grid = grid or CHINCHILLA_GRID
    return np.array(list(itertools.product(*(grid[k] for k in _ORDER))), dtype=float)


def _logs(n, d, loss):
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError("N, D and loss must have the same length")
    if len(n) < 5:
        raise ValueError(f"the parametric fit has 5 parameters: needs at least 5 runs, got {len(n)}")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any() or not np.isfinite(np.stack([n, d, loss])).all():
        raise ValueError("N, D and loss must be finite and > 0")
    return np.log(n), np.log(d), np.log(loss)


def _minimize(x0, args) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    with np.errstate(over="ignore", invalid="ignore"):
        res = minimize(objective, x0, args=args, jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS)
    if not np.isfinite(res.fun):
        return x0, float("inf")
    return res.x, float(res.fun)


def _best_of(inits: np.ndarray, args) -> tuple[Optional[np.ndarray], float]:
    best_x, best_f = None, float("inf")
    for x0 in inits:
        x, f = _minimize(x0, args)
        if f < best_f:
            best_x, best_f = x, f
    return best_x, best_f


class _pool:
    """A process pool of ``workers`` (None: one per CPU) as a context manager, or None-like for one process.
    Children run one BLAS thread each: OpenBLAS's own threads in every child made a 2-process fit 20x slower."""

    _ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, workers: Optional[int]):
        import os

        self.workers = workers if workers is not None else (os.cpu_count() or 1)

    def __bool__(self) -> bool:
        return self.workers > 1

    def __enter__(self):
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        self._saved = {k: os.environ.get(k) for k in self._ENV}
        os.environ.update({k: "1" for k in self._ENV})
        self.ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def map(self, fn, *iterables):
        out = list(self.ex.map(fn, *iterables))  # the children start (and read the environment) here
        return out

    def __exit__(self, *exc):
        import os

        self.ex.shutdown()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit_parametric(n, d, loss, *, delta: float = HUBER_DELTA, grid: Optional[dict] = None,
                   top_inits: Optional[int] = None, extra_inits: Sequence[np.ndarray] = (),
                   workers: Optional[int] = 1) -> ParametricFit:
    """Approach 3 (see the module doc). ``top_inits``: start L-BFGS only from the grid points with the lowest
    objective (None: from every grid point, as the paper); ``extra_inits``: more starting points;
    ``workers``: processes sharing the starting points (None: one per CPU)."""
    args = (*_logs(n, d, loss), delta)
    inits = _grid(grid)
    if top_inits is not None and top_inits < len(inits):
        with np.errstate(over="ignore", invalid="ignore"):
            vals = objective_batch(inits, *args)
        inits = inits[np.argsort(np.nan_to_num(vals, nan=np.inf))[:top_inits]]
    if len(extra_inits):
        inits = np.concatenate([inits, np.asarray(extra_inits, dtype=float).reshape(-1, 5)])
    pool = _pool(workers)
    if not pool or len(inits) < 64:
        best_x, best_f = _best_of(inits, args)
    else:
        k = 4 * pool.workers
        with pool:
            parts = pool.map(_best_of, np.array_split(inits, k), [args] * k)
        best_x, best_f = min(parts, key=lambda p: p[1])
    if best_x is None:
        raise RuntimeError("the parametric fit did not converge from any initialisation")
    a, b, e, alpha, beta = best_x
    with np.errstate(over="ignore"):  # a degenerate resample can run off to A or B = inf (dropped from intervals)
        big_e, big_a, big_b = (float(np.exp(x)) for x in (e, a, b))
    return ParametricFit(E=big_e, A=big_a, B=big_b, alpha=float(alpha), beta=float(beta), objective=best_f,
                         runs=len(args[0]), inits=len(inits))


def _bootstrap_chunk(n, d, loss, seeds, delta, grid, top_inits, theta) -> list:
    out = []
    for seed in seeds:
        i = np.random.default_rng([seed]).integers(0, len(n), len(n))
        if len(np.unique(i)) < 5:
            continue
        out.append((seed, fit_parametric(n[i], d[i], loss[i], delta=delta, grid=grid, top_inits=top_inits,
                                         extra_inits=[theta])))
    return out


def bootstrap_parametric(n, d, loss, *, samples: int = 200, seed: int = 0, delta: float = HUBER_DELTA,
                         grid: Optional[dict] = None, top_inits: int = 16, fit: Optional[ParametricFit] = None,
                         workers: Optional[int] = 1) -> list[ParametricFit]:
    """Refits on ``samples`` resamples (with replacement) of the runs. Each refit starts from the full-data
    fit and the ``top_inits`` best grid points for that resample (not the whole grid: 4,500 L-BFGS runs per
    resample would take minutes each)."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    fit = fit or fit_parametric(n, d, loss, delta=delta, grid=grid, workers=workers)
    seeds = [seed * 1_000_003 + k for k in range(samples)]
    pool = _pool(workers)
    if not pool or samples < 8:
        done = _bootstrap_chunk(n, d, loss, seeds, delta, grid, top_inits, fit.theta)
    else:
        k = pool.workers
        with pool:
            parts = pool.map(_bootstrap_chunk, *zip(*[(n, d, loss, seeds[j::k], delta, grid, top_inits, fit.theta)
                                                      for j in range(k)]))
        done = sorted((p for part in parts for p in part), key=lambda p: p[0])  # in seed order, whatever the workers
    return [f for _, f in done]


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    lo = (1 - level) / 2 * 100
    return float(np.percentile(v, lo)), float(np.percentile(v, 100 - lo))


# ---- Approach 2: IsoFLOP profiles -------------------------------------------------------------------------

def group_budgets(flops, rtol: float = 0.1) -> np.ndarray:
    """Labels 0.. of compute budgets: runs whose FLOPs are within ``rtol`` (relative, in sorted order) of the
    previous run's share a budget."""
    c = np.asarray(flops, dtype=float)
    order = np.argsort(c)
    labels = np.empty(len(c), dtype=int)
    g, prev = -1, None
    for i in order:
        if prev is None or c[i] > prev * (1 + rtol):
            g += 1
            prev = c[i]
        labels[i] = g
    return labels


@dataclass
class IsoFlopProfile:
    flops: float
    n: list
    d: list
    loss: list
    parabola: list = field(default_factory=list)
    """(p2, p1, p0): loss = p2 (ln N)^2 + p1 ln N + p0."""
    n_opt: float = float("nan")
    d_opt: float = float("nan")
    loss_opt: float = float("nan")
    inside: bool = False
    """The vertex lies within the profile's sizes (otherwise extrapolated)."""
    used: bool = False
    why_not: str = ""


@dataclass
class IsoFlopFit:
    profiles: list
    n_exponent: float = float("nan")
    n_coef: float = float("nan")
    d_exponent: float = float("nan")
    d_coef: float = float("nan")

    def optimal(self, flops: float) -> dict:
        with np.errstate(all="ignore"):
            n = float(self.n_coef * np.float64(flops) ** self.n_exponent)
            d = float(self.d_coef * np.float64(flops) ** self.d_exponent)
            return {"flops": flops, "N": n, "D": d, "tokens_per_param": d / n if n else float("nan")}

    def to_dict(self) -> dict:
        return asdict(self)


def _profile(c: float, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> IsoFlopProfile:
    p = IsoFlopProfile(flops=float(c), n=n.tolist(), d=d.tolist(), loss=loss.tolist())
    if len(np.unique(n)) < 3:
        p.why_not = "fewer than 3 model sizes"
        return p
    x = np.log(n)
    p2, p1, p0 = np.polyfit(x, loss, 2)
    p.parabola = [float(p2), float(p1), float(p0)]
    if p2 <= 0:
        p.why_not = "the parabola opens downward (no minimum)"
        return p
    xv = -p1 / (2 * p2)
    with np.errstate(over="ignore"):
        p.n_opt = float(np.exp(xv))
    p.loss_opt = float(p0 - p1 * p1 / (4 * p2))
    s, i = np.polyfit(x, np.log(d), 1)  # this profile's D(N) in log-log
    with np.errstate(over="ignore"):
        p.d_opt = float(np.exp(i + s * xv))
    p.inside = bool(x.min() <= xv <= x.max())
    p.used = True
    return p


def fit_isoflop(n, d, flops, loss, budget=None, rtol: float = 0.1) -> IsoFlopFit:
    """Approach 2 (see the module doc). ``budget``: labels of the IsoFLOP profiles (default: FLOPs grouped
    with ``group_budgets``); each profile's compute is the median FLOPs of its runs."""
    n, d, c, loss = (np.asarray(x, dtype=float) for x in (n, d, flops, loss))
    labels = np.asarray(budget) if budget is not None else group_budgets(c, rtol)
    profiles = []
    for g in sorted(set(labels.tolist())):
        m = labels == g
        o = np.argsort(n[m])
        profiles.append(_profile(float(np.median(c[m])), n[m][o], d[m][o], loss[m][o]))
    fit = IsoFlopFit(profiles=profiles)
    used = [p for p in profiles if p.used]
    if len(used) >= 2:
        lc = np.log([p.flops for p in used])
        fit.n_exponent, ln_kn = (float(v) for v in np.polyfit(lc, np.log([p.n_opt for p in used]), 1))
        fit.d_exponent, ln_kd = (float(v) for v in np.polyfit(lc, np.log([p.d_opt for p in used]), 1))
        with np.errstate(over="ignore"):  # resamples with far-off vertices can overflow: inf, left out of intervals
            fit.n_coef, fit.d_coef = float(np.exp(ln_kn)), float(np.exp(ln_kd))
    return fit


def bootstrap_isoflop(n, d, flops, loss, budget=None, *, samples: int = 1000, seed: int = 0,
                      rtol: float = 0.1) -> list[IsoFlopFit]:
    """Refits on resamples of the runs within each budget (the profiles keep their sizes of sample)."""
    n, d, c, loss = (np.asarray(x, dtype=float) for x in (n, d, flops, loss))
    labels = np.asarray(budget) if budget is not None else group_budgets(c, rtol)
    groups = [np.flatnonzero(labels == g) for g in sorted(set(labels.tolist()))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        i = np.concatenate([rng.choice(g, len(g), replace=True) for g in groups])
        # np.polyfit warns (RankWarning) on resamples that repeat one size; those profiles are dropped anyway
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = fit_isoflop(n[i], d[i], c[i], loss[i], labels[i])
        if np.isfinite(f.n_exponent):
            out.append(f)
    return out
