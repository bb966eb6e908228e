"""How reports write estimates, and the bootstrap intervals behind them: bounded, covering the mean, honest about
which resampling made them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medaug.report_numbers import decimals_for, kid_text, mean_spread, p_text, with_interval
from medaug.segmentation.stats import bootstrap_interval, difference_bounds, score_tables, verdict


@pytest.mark.parametrize("mean, spread, expected", [
    (0.03621, 0.0203, "0.036 ± 0.020"),
    (12.345, 0.8, "12.35 ± 0.80"),
    (0.1, 1e-16, "0.1"),  # rounding error is no spread: never "± 1e-16"
    (-0.5, 0.12, "−0.50 ± 0.12"),
    (1234.5, 56.0, "1234 ± 56"),
])
def test_mean_and_spread_share_the_spread_s_two_significant_figures(mean, spread, expected):
    assert mean_spread(mean, spread) == expected


def test_decimals_follow_the_spread_and_refuse_a_non_positive_one():
    assert [decimals_for(s) for s in (0.26, 0.02, 3.0, 45.0)] == [2, 3, 1, 0]
    with pytest.raises(ValueError):
        decimals_for(0.0)


def test_kid_below_zero_reads_as_zero_within_noise():
    assert kid_text(-0.036, 0.02) == "≈ 0 (−0.036 ± 0.020, within estimator noise)"
    assert kid_text(0.01, 0.02) == "0.010 ± 0.020 (within estimator noise of 0)"
    assert kid_text(0.5, 0.02) == "0.500 ± 0.020"
    assert kid_text(-0.0087, 0.0).startswith("≈ 0 (−0.0087, one estimate")


def test_intervals_are_written_as_low_high_with_digits_from_their_width():
    assert with_interval(0.225, 0.0, 0.74) == "0.23 [0.00, 0.74]"
    assert with_interval(0.031, 0.004, 0.058, signed=True) == "+0.031 [+0.004, +0.058]"
    assert with_interval(0.7, math.nan, math.nan) == "0.700"
    assert p_text(0.0004) == "< 0.001" and p_text(0.031) == "0.031" and p_text(math.nan) == "–"


def test_bootstrap_over_three_scattered_seeds_stays_inside_zero_one_and_covers_the_mean():
    # The Student-t interval of these seeds is 0.223 ± 0.811: far below 0 and above 1.
    seeds = [0.05, 0.02, 0.6]
    interval = bootstrap_interval(seeds, bounds=(0.0, 1.0))
    assert 0.0 <= interval["ci_low"] <= interval["mean"] <= interval["ci_high"] <= 1.0
    assert interval["mean"] == pytest.approx(np.mean(seeds))
    assert interval["ci_method"].endswith("over seeds (2000 resamples)")


def test_bootstrap_over_seeds_and_images_is_clipped_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    few = np.clip(rng.normal(0.05, 0.2, (3, 10)), 0, 1)  # mostly zeros: an unclipped interval would dip below 0
    many = np.clip(rng.normal(0.5, 0.2, (3, 400)), 0, 1)
    narrow, wide = bootstrap_interval(many.tolist(), (0, 1)), bootstrap_interval(few.tolist(), (0, 1))
    assert wide["ci_low"] >= 0.0 and "seeds and test images" in wide["ci_method"]
    assert narrow["ci_high"] - narrow["ci_low"] < min(0.1, wide["ci_high"] - wide["ci_low"])
    assert narrow["ci_low"] < many.mean() < narrow["ci_high"]


def test_bootstrap_leaves_undefined_scores_out_and_says_when_there_is_no_interval():
    assert math.isnan(bootstrap_interval([0.7])["ci_low"]) and bootstrap_interval([0.7, None])["mean"] == 0.7
    with_nan = bootstrap_interval([[1.0, math.nan, 3.0], [1.0, 2.0, 3.0]])
    assert with_nan["mean"] == pytest.approx(2.0) and 1.0 <= with_nan["ci_low"] < with_nan["ci_high"] <= 3.0


def _run(seed: int, dice: list[float]) -> dict:
    names = [f"image_{i}.png" for i in range(len(dice))]
    return {"seed": seed, "metrics": {"dice": float(np.mean(dice))},
            "per_image": {"file_name": names, "dice": dice, "has_lesion": [True] * len(dice)}}


def test_paired_tables_pair_by_seed_and_image_and_the_verdict_needs_interval_and_test():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.7, (2, 30))
    arm_runs = [_run(s, list(base[s] + 0.1)) for s in (0, 1)] + [_run(5, [0.0] * 30)]  # seed 5 has no partner
    base_runs = [_run(s, list(base[s])) for s in (1, 0)]
    arm, baseline = score_tables("dice", arm_runs, base_runs)
    difference = np.asarray(arm) - np.asarray(baseline)
    assert difference.shape == (2, 30) and np.allclose(difference, 0.1)
    interval = bootstrap_interval(difference.tolist(), difference_bounds((0.0, 1.0)))
    assert interval["ci_low"] == pytest.approx(0.1) and verdict(interval, 0.001) == "better"
    assert verdict(interval, 0.2) == "no clear difference"  # interval excludes 0, the test does not agree
    assert verdict({"ci_low": -0.02, "ci_high": 0.05}, 0.01) == "no clear difference"
    assert verdict({"ci_low": 2.0, "ci_high": 5.0}, 0.01, higher_is_better=False) == "worse"
