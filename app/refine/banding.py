"""LSH banding, recall first: how many bands of how many signature values.

Every LSH candidate is verified against the exact Jaccard, so a false candidate costs one check while a missed
pair is lost for good. ``choose_banding`` takes the bands x rows (within ``num_perm``) whose collision
probability at the threshold is at least ``min_recall`` and, among those, the one with the fewest expected
candidates below the threshold. datasketch's ``MinHashLSH`` optimum weighs false positives against false
negatives instead (16 bands x 8 rows at 0.8 with weights 0.05/0.95: a pair at exactly 0.8 is found with
probability 0.947). Written by hand: a dozen lines of arithmetic that no library offers in this form.

Glossary
    s           Jaccard similarity of two shingle sets (the chance that one MinHash value agrees)
    r, b        rows per band, bands; one band collides with probability s**r, some band with 1 - (1 - s**r)**b
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Banding:
    """An LSH banding and what it costs: ``bands`` keys of ``rows`` signature values each."""

    bands: int
    rows: int
    recall_at_threshold: float
    """P(a pair at exactly the threshold's Jaccard shares a band) = 1 - (1 - t**rows)**bands."""
    false_candidates: float
    """Expected candidates per pair below the threshold, its Jaccard uniform on [0, t): the mean of the
    collision probability over [0, t) (datasketch's false-positive integral, divided by t)."""
    chosen_by: str
    """"min_recall" (the chooser) or "config" (``dedup.near.bands``/``rows`` given)."""

    def as_dict(self) -> dict:
        return {"bands": self.bands, "rows": self.rows, "recall_at_threshold": round(self.recall_at_threshold, 6),
                "false_candidates": round(self.false_candidates, 8), "chosen_by": self.chosen_by}


def collision_probability(s, bands: int, rows: int):
    """P(two sets of Jaccard ``s`` share at least one band key): 1 - (1 - s**rows)**bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


def _false_candidates(threshold: float, bands: int, rows: int, points: int = 2001) -> float:
    s = np.linspace(0.0, threshold, points)  # trapezoid rule on a fine grid (a smooth, monotone integrand)
    p = collision_probability(s, bands, rows)
    return float(((p[1:] + p[:-1]) / 2).mean())


def choose_banding(threshold: float, num_perm: int, min_recall: float, *, bands: Optional[int] = None,
                   rows: Optional[int] = None) -> Banding:
    """Recall-first banding: ``bands * rows <= num_perm`` with ``recall_at_threshold >= min_recall``, the fewest
    expected false candidates among those. For each ``rows`` the fewest bands that reach ``min_recall`` are best
    (more bands only add candidates), so the search is one candidate per ``rows``.

    ``bands`` and/or ``rows`` fix that part of the choice (both: taken as given, recall as it comes). ValueError
    when nothing within ``num_perm`` reaches ``min_recall`` (say which threshold/num_perm to raise).
    """
    if bands is not None and rows is not None:
        if bands * rows > num_perm:
            raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {num_perm}")
        return Banding(bands, rows, float(collision_probability(threshold, bands, rows)),
                       _false_candidates(threshold, bands, rows), "config")
    best: Optional[Banding] = None
    for r in ([rows] if rows is not None else range(1, num_perm + 1)):
        p_band = threshold ** r  # one band of r rows collides at the threshold
        if bands is not None:
            b = bands
        elif p_band >= 1.0:
            b = 1
        elif p_band <= 0.0:
            continue
        else:
            need = math.log1p(-min_recall) / math.log1p(-p_band)  # inf when p_band is denormal
            if not math.isfinite(need) or need > num_perm + 1:  # more bands than num_perm allows
                continue
            b = max(1, math.ceil(need - 1e-9))
            while b > 1 and collision_probability(threshold, b - 1, r) >= min_recall:  # guard the float rounding
                b -= 1
            while collision_probability(threshold, b, r) < min_recall and b * r <= num_perm:
                b += 1
        if b * r > num_perm:
            continue
        recall = float(collision_probability(threshold, b, r))
        if recall < min_recall:
            continue
        cand = Banding(b, r, recall, _false_candidates(threshold, b, r), "min_recall")
        if best is None or (cand.false_candidates, -cand.recall_at_threshold) < (best.false_candidates, -best.recall_at_threshold):
            best = cand
    if best is None:
        fixed = f" with bands={bands}" if bands is not None else f" with rows={rows}" if rows is not None else ""
        raise ValueError(f"no LSH banding within num_perm={num_perm}{fixed} finds pairs at Jaccard {threshold} with "
                         f"probability >= dedup.near.min_recall={min_recall}: raise num_perm or lower min_recall")
    return best
