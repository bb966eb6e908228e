"""Statistics over seeds and over paired test images."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval; the half-width is NaN for fewer than 2 values."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan
    sem = float(array.std(ddof=1)) / math.sqrt(array.size)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, df=array.size - 1) * sem)


def paired_test(arm: list[float], baseline: list[float]) -> dict:
    """Wilcoxon signed-rank test of per-image scores against the baseline's on the same images.

    Pairs where either value is not finite (an undefined HD95) are dropped. Returns the number of pairs,
    the mean difference (arm minus baseline) and the two-sided p-value (NaN where the test is undefined:
    fewer than two pairs, or every difference zero).
    """
    a = np.asarray(arm, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    result = {"test": "wilcoxon", "n_pairs": int(a.size),
              "mean_difference": float((a - b).mean()) if a.size else math.nan, "p_value": math.nan}
    if a.size < 2 or np.all(a == b):
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result["p_value"] = float(stats.wilcoxon(a, b).pvalue)
    return result
