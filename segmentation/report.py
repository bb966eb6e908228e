"""A study's results: `results.json` (everything), `results.md` (a table to paste), plots (metric vs ratio) and
`report.html` (all of it on one self-contained page, with each arm's predictions on a few test images).

Each arm × real fraction × ratio is a group of runs, one per seed. A group's score is the mean over its seeds with
a 95% percentile bootstrap interval over seeds and test images (over seeds alone for AUC and macro-F1, which have
no per-image score), clipped to the metric's range. Each group is compared with real-only at the same real
fraction (the synthetic-only arm with real-only at the largest fraction) by a Wilcoxon signed-rank test on
per-image scores of the same test images, each averaged over the seeds both groups have, and by a bootstrap
interval of the paired difference (same seed, same image); the verdict needs both to agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medaug.files import write_json_atomic
from medaug.segmentation.metrics import CLASSIFICATION_METRICS, HIGHER_IS_BETTER, SEGMENTATION_METRICS
from medaug.segmentation.train_seg import PLATEAU_TOLERANCE
from medaug.report_numbers import p_text, with_interval
from medaug.segmentation.stats import (BOUNDS, bootstrap_interval, difference_bounds, mean_ci, paired_test,
                                       resolvable_difference, score_tables, verdict)

METRICS = {"seg": SEGMENTATION_METRICS + ("dice_lesion",), "cls": CLASSIFICATION_METRICS}
PAIRED = {"seg": ("dice", "iou", "hd95"), "cls": ("prob_true", "correct")}
PRIMARY = {"seg": "dice", "cls": "auc"}
PRIMARY_PAIRED = {"seg": "dice", "cls": "prob_true"}
LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)", "dice_lesion": "Dice (lesion images)", "auc": "AUC",
          "accuracy": "Accuracy", "macro_f1": "Macro-F1", "prob_true": "p(true class)", "correct": "correct"}
RUN_FIELDS = ("run_id", "arm", "real_fraction", "ratio", "seed", "n_train_real", "n_train_synthetic",
              "steps", "seconds", "metrics")


def write_report(output_dir: str | Path, settings: dict, data, results: list[dict], notes: list[str]) -> dict:
    """Summarise finished runs and write results.json, results.md and one plot per metric."""
    output_dir = Path(output_dir)
    task = settings["task"]
    summary = {
        "task": task,
        "settings": settings,
        "primary_metric": PRIMARY[task],
        "metrics": list(METRICS[task]),
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                   "synthetic": len(data.synthetic)},
        "classes": list(data.classes),
        "validation": data.validation.record() if data.validation else None,
        "groups": summarise_groups(results, task),
        "learning_curve": plateau_rows(results) if task == "seg" else [],
        "runs": [{key: result.get(key) for key in RUN_FIELDS} for result in results],
        "notes": list(dict.fromkeys(notes)),
    }
    summary["plots"] = [path.name for path in plot_results(output_dir, summary)]
    summary["report"] = "report.html"
    write_json_atomic(output_dir / "results.json", summary)
    (output_dir / "results.md").write_text(markdown_report(summary))
    write_html_report(output_dir, summary, data)
    return summary


def write_html_report(output_dir: Path, summary: dict, data) -> Path:
    from medaug.files import write_text_atomic
    from medaug.segmentation.report_html import render_html

    return write_text_atomic(output_dir / "report.html", render_html(output_dir, summary, data))


def summarise_groups(results: list[dict], task: str) -> list[dict]:
    """Mean and 95% bootstrap interval of each group, and its paired comparison with real-only."""
    grouped: dict[tuple, list[dict]] = {}
    for result in results:
        grouped.setdefault((result["arm"], result["real_fraction"], result["ratio"]), []).append(result)
    fractions = [key[1] for key in grouped if key[0] == "real"]
    groups = []
    for (arm, fraction, ratio), runs in grouped.items():
        group = {
            "arm": arm, "real_fraction": fraction, "ratio": ratio, "seeds": sorted(r["seed"] for r in runs),
            "n_train_real": runs[0]["n_train_real"], "n_train_synthetic": runs[0]["n_train_synthetic"],
            "metrics": {}, "paired_vs_real": {},
        }
        for metric in METRICS[task]:
            values = [_number(r["metrics"].get(metric)) for r in runs]
            interval = bootstrap_interval(score_tables(metric, runs)[0], BOUNDS.get(metric))
            # ci95: the Student-t half-width over seeds, kept for older readers of results.json; reports use the
            # bootstrap interval, which stays inside the metric's range
            group["metrics"][metric] = {**interval, "ci95": mean_ci(values)[1], "values": values}
        baseline_fraction = max(fractions) if arm == "synthetic" and fractions else fraction
        baseline = grouped.get(("real", baseline_fraction, 0.0))
        if arm != "real" and baseline:
            group["baseline"] = {"arm": "real", "real_fraction": baseline_fraction}
            group["paired_vs_real"] = {metric: _paired(runs, baseline, metric) for metric in PAIRED[task]}
        groups.append(group)
    return groups


def _paired(runs: list[dict], baseline: list[dict], metric: str) -> dict:
    seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in baseline})
    if not seeds:
        return {"test": "wilcoxon", "n_pairs": 0, "mean_difference": math.nan, "p_value": math.nan, "seeds": []}
    arm_scores = _per_image_mean([r for r in runs if r["seed"] in seeds], metric)
    base_scores = _per_image_mean([r for r in baseline if r["seed"] in seeds], metric)
    names = sorted(set(arm_scores) & set(base_scores))
    result = paired_test([arm_scores[n] for n in names], [base_scores[n] for n in names])
    arm_table, base_table = score_tables(metric, runs, baseline)
    difference = (np.asarray(arm_table, float) - np.asarray(base_table, float)).tolist()
    interval = bootstrap_interval(difference, difference_bounds(BOUNDS.get(metric)))
    del interval["mean"]  # the point estimate is the test's mean_difference
    return {**result, **interval, "seeds": seeds, "resolvable": resolvable_difference(interval),
            "verdict": verdict(interval, result["p_value"], HIGHER_IS_BETTER.get(metric, True))}


def _per_image_mean(runs: list[dict], metric: str) -> dict[str, float]:
    """Per test image, the metric averaged over `runs` (seeds); NaN where any seed leaves it undefined."""
    table: dict[str, list[float]] = {}
    for run in runs:
        for name, value in zip(run["per_image"]["file_name"], run["per_image"][metric]):
            table.setdefault(name, []).append(_number(value))
    return {name: float(np.mean(values)) for name, values in table.items()}


def _number(value) -> float:
    return math.nan if value is None else float(value)


def plateau_rows(results: list[dict]) -> list[dict]:
    """Per real fraction, where the real-only arm's validation Dice levelled (median over its runs) and how its
    last validation compares with its best: has the yardstick finished learning?"""
    rows = []
    for fraction in sorted({r["real_fraction"] for r in results if r["arm"] == "real"}):
        histories = [r["history"] for r in results
                     if r["arm"] == "real" and r["real_fraction"] == fraction and r["history"].get("val_dice")]
        if histories:
            rows.append({"real_fraction": fraction, "steps": histories[0]["steps"], "runs": len(histories),
                         "plateau_step": float(np.median([h["plateau_step"] for h in histories])),
                         "last_minus_best": float(np.mean([h["val_dice"][-1] - max(h["val_dice"])
                                                           for h in histories]))})
    return rows


def plateau_text(summary: dict) -> list[str]:
    return [f"Real-only at {row['real_fraction']:g}: validation Dice levelled at step {row['plateau_step']:.0f} of "
            f"{row['steps']} (median of {row['runs']} runs; within {PLATEAU_TOLERANCE} of its best), last validation "
            f"{row['last_minus_best']:+.3f} from the best." for row in summary.get("learning_curve", [])]


def settings_sentence(summary: dict) -> str:
    """How the runs were trained, in one paragraph (results.md and report.html)."""
    settings, images = summary["settings"], summary["images"]
    tested = {"last": "the last weights are tested", "best_val": "the best of about 20 validations is tested"}[
        settings["select"]] if summary["task"] == "seg" else "the weights with the lowest validation loss are tested"
    return (f"Real data {settings['data']}: {images['train']} train, {images['val']} val, {images['test']} test "
            f"images; {images['synthetic']} synthetic images from {len(settings['synthetic'])} folder(s). Network "
            f"{settings['network']} at {settings['resolution']} px ({settings['fit']}), "
            f"batch {settings['batch_size']}, "
            f"learning rate {settings['learning_rate']:g}; every arm takes the same {settings['steps']} optimiser "
            f"steps whatever its number of images, every arm has left-right flips, and {tested}."
            + validation_sentence(summary))


def validation_sentence(summary: dict) -> str:
    """What the validation rows decided, and where they came from (medaug.data.validation)."""
    validation = summary.get("validation")
    if not validation:
        return ""
    seg_last = summary["task"] == "seg" and summary["settings"]["select"] == "last"
    uses = "the learning curve only" if seg_last else "the learning curve and which weights are tested"
    return f" Validation rows ({uses}): {validation['origin']}."


def markdown_report(summary: dict) -> str:
    """A header saying how the numbers were made, then one table row per group."""
    task = summary["task"]
    metrics = summary["metrics"]
    primary = PRIMARY_PAIRED[task]
    lines = [
        f"# medaug bench {task}: results",
        "",
        settings_sentence(summary),
        "",
        INTERVAL_TEXT + " " + paired_text(primary),
        "",
        "| " + " | ".join(table_header(summary)) + " |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in metrics) + " | ---: | ---: | ---: | --- |",
    ]
    for cells in table_rows(summary):
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *plateau_text(summary)] if summary.get("learning_curve") else []
    if summary["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in summary["notes"]]
    if summary["plots"]:
        lines += ["", "Plots: " + ", ".join(f"`{name}`" for name in summary["plots"])]
    return "\n".join(lines) + "\n"


INTERVAL_TEXT = ("Scores on the real test split: mean over seeds [95% percentile bootstrap interval over seeds and "
                 "test images, clipped to the metric's range; over seeds alone for AUC and macro-F1].")


def paired_text(primary: str) -> str:
    return (f"Δ: mean paired difference in per-image {LABELS[primary]} against real-only at the same real fraction "
            "(synthetic-only: at the largest) [bootstrap interval over seeds and images, pairs of the same seed and "
            "image]; p: Wilcoxon signed-rank test of per-image scores, each averaged over the seeds both arms have. "
            "Verdict 'better' or 'worse' only where the interval excludes 0 and p < 0.05; otherwise 'no clear "
            "difference'.")


def table_header(summary: dict) -> list[str]:
    primary = PRIMARY_PAIRED[summary["task"]]
    return (["Arm", "Real fraction", "Synthetic ratio", "Train images (real + synthetic)", "Seeds"]
            + [LABELS[m] for m in summary["metrics"]]
            + [f"Δ {LABELS[primary]} vs real", "resolvable Δ", "p", "verdict"])


def table_rows(summary: dict) -> list[list[str]]:
    """One row of text cells per group, in the order of `table_header`."""
    primary = PRIMARY_PAIRED[summary["task"]]
    rows = []
    for group in summary["groups"]:
        paired = group["paired_vs_real"].get(primary)
        cells = [group["arm"], f"{group['real_fraction']:g}" if group["arm"] != "synthetic" else "0",
                 f"{group['ratio']:g}" if group["ratio"] else "–",
                 f"{group['n_train_real']} + {group['n_train_synthetic']}", str(len(group["seeds"]))]
        cells += [interval_text(group["metrics"][m]) for m in summary["metrics"]]
        cells += [difference_text(paired), f"{paired['resolvable']:.3f}", p_text(paired["p_value"]),
                  paired["verdict"]] if paired else ["–", "–", "–", "–"]
        rows.append(cells)
    return rows


def interval_text(score: dict) -> str:
    return with_interval(_number(score["mean"]), _number(score.get("ci_low")), _number(score.get("ci_high")))


def difference_text(paired: dict) -> str:
    return with_interval(_number(paired["mean_difference"]), _number(paired.get("ci_low")),
                         _number(paired.get("ci_high")), signed=True)


def plot_results(output_dir: Path, summary: dict) -> list[Path]:
    """One PNG per metric: the metric against the synthetic ratio, one panel per real fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    fractions = sorted({g["real_fraction"] for g in groups if g["arm"] != "synthetic"})
    if not fractions:
        return []
    paths = []
    for metric in summary["metrics"]:
        figure, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.4), squeeze=False,
                                    sharey=True)
        for axis, fraction in zip(axes[0], fractions):
            _plot_panel(axis, groups, fraction, metric)
        axes[0][0].set_ylabel(LABELS[metric] + ("" if HIGHER_IS_BETTER[metric] else " (lower is better)"))
        axes[0][-1].legend(fontsize=7, loc="best")
        figure.tight_layout()
        path = output_dir / f"{metric}_vs_ratio.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def _plot_panel(axis, groups: list[dict], fraction: float, metric: str) -> None:
    """Lines start at ratio 0 with their arm's synthetic-free counterpart (real, classical)."""
    for base_arm, arm, style in (("real", "real+synthetic", "o-"),
                                 ("real+classical", "real+classical+synthetic", "s--")):
        points = [g for g in groups if g["real_fraction"] == fraction and g["arm"] in (base_arm, arm)]
        points = sorted(points, key=lambda g: g["ratio"])
        if not points:
            continue
        xs = [g["ratio"] for g in points]
        ys = [_number(g["metrics"][metric]["mean"]) for g in points]
        errors = np.array([_error_bar(g["metrics"][metric]) for g in points]).T
        axis.errorbar(xs, ys, yerr=errors, fmt=style, capsize=3, label=arm if len(points) > 1 else base_arm)
    for group in groups:
        if group["arm"] == "synthetic":
            axis.axhline(_number(group["metrics"][metric]["mean"]), color="grey", linestyle=":",
                         label="synthetic only")
    axis.set_title(f"real fraction {fraction:g}", fontsize=9)
    axis.set_xlabel("synthetic images per real image")
    axis.grid(alpha=0.3)


def _error_bar(score: dict) -> tuple[float, float]:
    """(below, above) the mean, from the bootstrap interval; none where there is no interval."""
    mean, low, high = _number(score["mean"]), _number(score.get("ci_low")), _number(score.get("ci_high"))
    if math.isnan(low) or math.isnan(high):
        return 0.0, 0.0
    return max(0.0, mean - low), max(0.0, high - mean)
