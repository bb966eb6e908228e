"""Statistics over seeds and over paired test images.

`bootstrap_interval` is what reports show: a percentile bootstrap of the mean, over seeds and, where per-image
scores exist, over test images too, clipped to the metric's range, so a Dice interval never leaves [0, 1] as a
Student-t interval over three seeds does ("0.225 ± 0.514"). `mean_ci` (Student t) stays for callers that ask for it.
"""

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


BOOTSTRAP_RESAMPLES = 2000
BOUNDS = {"dice": (0.0, 1.0), "iou": (0.0, 1.0), "dice_lesion": (0.0, 1.0), "auc": (0.0, 1.0),
          "accuracy": (0.0, 1.0), "macro_f1": (0.0, 1.0), "prob_true": (0.0, 1.0), "correct": (0.0, 1.0),
          "hd95": (0.0, math.inf)}


def difference_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range of (arm - baseline) when each lies in `bounds`."""
    if bounds is None:
        return None
    low, high = bounds
    return low - high, high - low


def _score_matrix(scores) -> np.ndarray:
    """(seeds, images) float matrix; a 1-D sequence is one score per seed (None counts as undefined)."""
    array = np.asarray([[math.nan if v is None else v for v in row] for row in scores] if _nested(scores)
                       else [[math.nan if v is None else v] for v in scores], dtype=float)
    keep = ~np.all(np.isnan(array), axis=1) if array.size else np.zeros(0, bool)
    return array[keep]


def _nested(scores) -> bool:
    return len(scores) > 0 and isinstance(scores[0], (list, tuple, np.ndarray))


def _statistic(matrix: np.ndarray, seeds: np.ndarray, images: np.ndarray) -> np.ndarray:
    """For each resample: the mean over its seeds of the mean over its images (NaN scores left out)."""
    picked = matrix[seeds[:, :, None], images[:, None, :]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of only undefined scores is NaN
        return np.nanmean(np.nanmean(picked, axis=2), axis=1)


def bootstrap_interval(scores, bounds: tuple[float, float] | None = None, confidence: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Mean and percentile bootstrap interval of the mean, clipped to `bounds`.

    `scores`: one value per seed, or a (seeds, images) table of per-image scores (NaN: undefined, left out), where
    each resample draws seeds and, within them, test images with replacement. The point estimate is the mean over
    seeds of each seed's mean, as the runs report it. The interval is NaN where nothing varies that can be
    resampled (one seed without per-image scores)."""
    matrix = _score_matrix(scores)
    result = {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "ci_method": _method(matrix, confidence)}
    if matrix.size == 0:
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result["mean"] = float(np.nanmean(np.nanmean(matrix, axis=1)))
    seeds_count, images_count = matrix.shape
    if seeds_count < 2 and images_count < 2:
        return result
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, 250):  # bounded memory: 250 x seeds x images at a time
        block = min(250, resamples - start)
        values.append(_statistic(matrix, rng.integers(0, seeds_count, (block, seeds_count)),
                                 rng.integers(0, images_count, (block, images_count))))
    values = np.concatenate(values)
    values = values[np.isfinite(values)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    if bounds is not None:
        low, high = np.clip([low, high], *bounds)
    result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


def _method(matrix: np.ndarray, confidence: float) -> str:
    over = "seeds and test images" if matrix.ndim == 2 and matrix.shape[1] > 1 else "seeds"
    return f"{confidence:.0%} percentile bootstrap over {over} ({BOOTSTRAP_RESAMPLES} resamples)"


def verdict(difference: dict, p_value: float, higher_is_better: bool = True, alpha: float = 0.05) -> str:
    """One phrase for a paired difference that the interval and the test both support.

    'better' or 'worse' only when the interval of the difference excludes 0 and the paired test agrees;
    otherwise 'no clear difference', so a small p never sits beside an interval that holds 0 unremarked."""
    low, high = difference.get("ci_low", math.nan), difference.get("ci_high", math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval (one seed)" if not math.isfinite(p_value) else "no clear difference"
    excludes_zero = low > 0 or high < 0
    if not excludes_zero or not (math.isfinite(p_value) and p_value < alpha):
        return "no clear difference"
    return "better" if (low > 0) == higher_is_better else "worse"


PER_IMAGE_SOURCE = {"dice_lesion": "dice", "accuracy": "correct"}  # run metrics that are means of per-image scores


def per_image(run: dict, metric: str) -> dict[str, float] | None:
    """A run's per-test-image scores of `metric` by file name (None where the metric has none, e.g. AUC)."""
    scores = run.get("per_image") or {}
    source = PER_IMAGE_SOURCE.get(metric, metric)
    if source not in scores or "file_name" not in scores:
        return None
    keep = scores["has_lesion"] if metric == "dice_lesion" else [True] * len(scores[source])
    return {name: math.nan if value is None else float(value)
            for name, value, kept in zip(scores["file_name"], scores[source], keep) if kept}


def replicate(run: dict) -> tuple[int, int]:
    """What pairs two runs: the subset draw (0 where a study has one) and the seed."""
    return run.get("draw", 0), run["seed"]


def score_tables(metric: str, *groups: list[dict]) -> list:
    """For each group of runs, its (replicates, images) per-image table over the replicates (subset draw and seed)
    and images all groups share, rows in replicate order, so tables of two arms pair by draw, seed and image; one
    score per replicate where a run has no per-image scores of `metric`."""
    keys = sorted(set.intersection(*[{replicate(run) for run in group} for group in groups]))
    chosen = [{replicate(run): run for run in group} for group in groups]
    images = [per_image(chosen_runs[k], metric) for chosen_runs in chosen for k in keys]
    if not keys or any(table is None for table in images):
        return [[_run_metric(runs[k], metric) for k in keys] for runs in chosen]
    names = sorted(set.intersection(*[set(table) for table in images]))
    return [[[per_image(runs[k], metric)[n] for n in names] for k in keys] for runs in chosen]


def resolvable_difference(interval: dict, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference this design would call (at `confidence`, with `power`), from the spread of the
    observed paired differences: the bootstrap interval's standard error times (z_confidence + z_power)."""
    low, high = interval.get("ci_low", math.nan), interval.get("ci_high", math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    z_confidence = stats.norm.ppf(0.5 + confidence / 2)
    standard_error = (high - low) / (2 * z_confidence)
    return float(standard_error * (z_confidence + stats.norm.ppf(power)))


def _run_metric(run: dict, metric: str) -> float:
    value = run["metrics"].get(metric)
    return math.nan if value is None else float(value)
