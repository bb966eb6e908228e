"""What a low-data study writes: `summary.json` (for other tools), `results.md` (a table) and `report.html`.

Each arm x generator x real fraction is a group of runs, one per subset draw and seed (a replicate). Its score is
the mean test Dice over replicates with a 95% percentile bootstrap interval over replicates and test images, clipped
to [0, 1]; its differences against `real` and against `real+classical` are paired by draw, seed and test image (same
subset, same seed, same images), given the same kind of interval and a Wilcoxon signed-rank test of per-image Dice
averaged over the replicates, and called better or worse only where both agree. Beside each difference stands the
smallest difference the design could have resolved (80% power at 95% confidence, from the observed paired spread:
`medaug.segmentation.stats.resolvable_difference`), so "no clear difference" says how small a gain it could rule in.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

import numpy as np

from medaug.files import write_json_atomic, write_text_atomic
from medaug.lowdata.subsets import subset_name
from medaug.segmentation.report import plateau_rows, plateau_text
from medaug.report_numbers import p_text, with_interval
from medaug.segmentation.stats import (BOUNDS, bootstrap_interval, difference_bounds, paired_test, replicate,
                                       resolvable_difference, score_tables, verdict)

METRIC = "dice"
INTERVALS = ("95% percentile bootstrap interval over subset draws, seeds and test images, clipped to [0, 1]; Δ "
             "columns pair runs by draw, seed and test image, with a Wilcoxon signed-rank p on per-image Dice averaged "
             "over replicates, say better or worse only where the interval excludes 0 and p < 0.05, and give the "
             "smallest difference the design resolves (± r: 80% power at 95% confidence, from the paired spread)")

VALIDATION_USE = "the real-only learning curve, and each subset label-fidelity scorer's choice of weights"


def _interval(runs: list[dict]) -> dict:
    return bootstrap_interval(score_tables(METRIC, runs)[0], BOUNDS[METRIC])


def _runs(results: list[dict], arm: str, generator, fraction: float) -> list[dict]:
    return [r for r in results if r["arm"] == arm and r["generator"] == generator and r["real_fraction"] == fraction]


def _delta(runs: list[dict], baseline: list[dict]) -> dict | None:
    """Paired by draw, seed and test image: the mean difference, its bootstrap interval, the test, the verdict and
    the smallest difference the design resolves."""
    replicates = sorted({replicate(r) for r in runs} & {replicate(r) for r in baseline})
    if not replicates:
        return None
    arm_table, base_table = (np.asarray(table, float) for table in score_tables(METRIC, runs, baseline))
    interval = bootstrap_interval((arm_table - base_table).tolist(), difference_bounds(BOUNDS[METRIC]))
    image_means = [table.mean(axis=0) if table.ndim == 2 else table for table in (arm_table, base_table)]
    test = paired_test(list(image_means[0]), list(image_means[1]))
    return {**interval, "replicates": len(replicates), "test": test["test"], "p_value": test["p_value"],
            "verdict": verdict(interval, test["p_value"]), "resolvable": resolvable_difference(interval)}


def summary_rows(results: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys((r["arm"], r["generator"], r["real_fraction"]) for r in results))
    rows = []
    for arm, generator, fraction in keys:
        runs = _runs(results, arm, generator, fraction)
        real = _runs(results, "real", None, fraction)
        classical = _runs(results, "real+classical", None, fraction)
        rows.append({"arm": arm, "generator": generator, "real_fraction": fraction, **_interval(runs),
                     "replicates": len(runs), "draws": len({r.get("draw", 0) for r in runs}),
                     "seconds_per_run": float(np.mean([r.get("seconds", math.nan) for r in runs])),
                     "steps": runs[0]["steps"], "n_real": runs[0]["n_real"],
                     "n_synthetic": runs[0]["n_synthetic"],
                     "dice_lesion": float(np.mean([r["metrics"]["dice_lesion"] for r in runs])),
                     "hd95": float(np.nanmean([r["metrics"]["hd95"] for r in runs])),
                     "delta_vs_real": None if arm == "real" else _delta(runs, real),
                     "delta_vs_classical": None if arm == "real+classical" else _delta(runs, classical)})
    return rows


def _generator_rows(pairs: dict) -> list[dict]:
    rows = []
    for (draw, fraction, generator), record in pairs.items():
        fidelity, accepted = record["fidelity"], record["filter"]
        rows.append({"draw": draw, "real_fraction": fraction, "generator": generator,
                     "generated": record["generated"]["total"],
                     "kept": len(record["kept"]), **{f"fidelity_{k}": v for k, v in fidelity.items()},
                     "filter": accepted})
    return rows


def write_outputs(output_dir: Path, settings, results: list[dict], pairs: dict, subsets: dict, validation) -> dict:
    from dataclasses import asdict

    recipe = settings.seg_recipe()
    summary = {"task": "seg", "metric": METRIC, "rows": summary_rows(results), "generators": _generator_rows(pairs),
               "settings": asdict(settings), "recipe": recipe.settings(),
               "learning_curve": plateau_rows(results),
               "validation": {**validation.record(), "used_for": VALIDATION_USE},
               "subsets": {f"d{draw}/{subset_name(f)}": str(path) for (draw, f), path in subsets.items()},
               "equal_steps": f"Every arm trained for {recipe.steps} optimiser steps (batch {recipe.batch_size}, "
                              f"{recipe.resolution} px, {recipe.fit}, {recipe.schedule} Adam {recipe.learning_rate:g}, "
                              f"{recipe.select} weights tested; flips in every arm); synthetic_pretrain: half on "
                              "synthetic pairs, half on real"}
    write_json_atomic(output_dir / "summary.json", summary, indent=2)
    write_text_atomic(output_dir / "results.md", markdown(summary))
    write_text_atomic(output_dir / "report.html", render_html(output_dir, summary, results, pairs))
    return summary


def validation_sentence(summary: dict) -> str:
    validation = summary["validation"]
    return f"Validation rows ({validation['used_for']}): {validation['origin']}."


def _ci(block: dict | None, signed: bool = False) -> str:
    if block is None:
        return "–"
    text = with_interval(block["mean"], block["ci_low"], block["ci_high"], signed=signed)
    if not signed:
        return text
    return f"{text} ± {block['resolvable']:.3f} (p {p_text(block['p_value'])}, {block['verdict']})"


def table_rows(summary: dict) -> list[list[str]]:
    return [[f"{row['real_fraction']:g}", row["arm"], row["generator"] or "–", f"{row['n_real']}+{row['n_synthetic']}",
             _ci(row), _ci(row["delta_vs_real"], True), _ci(row["delta_vs_classical"], True),
             f"{row['dice_lesion']:.3f}", f"{row['hd95']:.1f}", f"{row['draws']}×{row['replicates'] // row['draws']}",
             f"{row['seconds_per_run']:.0f}"] for row in summary["rows"]]


HEADER = ["real fraction", "arm", "generator", "images (real+synthetic)", "Dice [95% interval]",
          "Δ vs real ± resolvable", "Δ vs real+classical ± resolvable", "Dice (lesion images)", "HD95 px",
          "draws×seeds", "s/run"]


def markdown(summary: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    generators = ["", "| draw | real fraction | generator | pairs generated | kept | label fidelity ratio | "
                  "synthetic Dice |", "| --- | --- | --- | --- | --- | --- | --- |"]
    generators += [f"| d{g['draw']} | {g['real_fraction']:g} | {g['generator']} | {g['generated']} | {g['kept']} | "
                   f"{g['fidelity_ratio']:.2f} | {g['fidelity_synthetic_dice']:.3f} |" for g in summary["generators"]]
    return "\n".join([f"Test Dice, mean over replicates [{INTERVALS}]. {summary['equal_steps']}.", "",
                      validation_sentence(summary), "", *lines, "",
                      *plateau_text(summary), *generators]) + "\n"


# ---- report.html -------------------------------------------------------------------------------------------


def _figure_uri(figure) -> str:
    import base64

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # keeps a legend placed outside
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dice_plot(summary: dict) -> str:
    """Dice per arm at each fraction; fractions evenly spaced and the arms side by side within each, so that one
    fraction alone still reads."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.8))
    fractions = sorted({row["real_fraction"] for row in summary["rows"]})
    series: dict[str, list[dict]] = {}
    for row in summary["rows"]:
        series.setdefault(row["arm"] + (f" ({row['generator']})" if row["generator"] else ""), []).append(row)
    width = 0.7 / max(1, len(series))
    for number, (name, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r["real_fraction"])
        positions = [fractions.index(r["real_fraction"]) + (number - (len(series) - 1) / 2) * width for r in rows]
        errors = np.array([(0, 0) if math.isnan(r["ci_high"]) else (r["mean"] - r["ci_low"], r["ci_high"] - r["mean"])
                           for r in rows]).T
        axis.errorbar(positions, [r["mean"] for r in rows], yerr=errors, marker="o", capsize=3, label=name)
    axis.set_xticks(range(len(fractions)), [f"{fraction:g}" for fraction in fractions])
    axis.set_xlabel("real fraction of the training split (95% bootstrap interval over seeds and test images)")
    axis.set_ylabel("test Dice")
    axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return _figure_uri(figure)


def learning_curve_plot(results: list[dict]) -> str:
    """Validation Dice of the real-only arm against optimiser steps: has it stopped rising by the last step?"""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    for result in results:
        if result["arm"] == "real" and result["history"]["val_dice"]:
            history = result["history"]
            line, = axis.plot(history["val_steps"], history["val_dice"], alpha=0.7,
                              label=f"{subset_name(result['real_fraction'])} d{result.get('draw', 0)} "
                                    f"seed {result['seed']}")
            axis.axvline(history["plateau_step"], color=line.get_color(), alpha=0.3, linestyle=":")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("val Dice (real only)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    return _figure_uri(figure)


def fidelity_plot(pairs: dict) -> str:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.2))
    for (draw, fraction, generator), record in pairs.items():
        if record["dice"] and draw == 0:
            axis.hist(record["dice"], bins=20, range=(0, 1), alpha=0.5, label=f"{subset_name(fraction)} {generator}")
    axis.set_xlabel("Dice of the scorer on a synthetic image against its own mask")
    axis.set_ylabel("pairs")
    if axis.get_legend_handles_labels()[0]:  # no generator: an empty plot, no legend
        axis.legend(fontsize=6)
    figure.tight_layout()
    return _figure_uri(figure)


def _thumbs(views: list[tuple[str, np.ndarray]]) -> str:
    from medaug.report import png_data_uri

    cells = [f'<figure style="margin:0"><img src="{png_data_uri(view)}" alt="{html.escape(caption)}">'
             f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>' for caption, view in views]
    return f'<div class="grid">{"".join(cells)}</div>'


def pair_views(synthetic_dir: Path, kept: list[str], count: int = 8) -> list[tuple[str, np.ndarray]]:
    from medaug.data import DatasetFolder, load_image, load_mask
    from medaug.report import outlined

    folder = DatasetFolder(synthetic_dir)
    kept_set = set(kept[:count])
    views = []
    for index in range(len(folder)):
        name = folder.value(index, "file_name")
        if name in kept_set:
            image, mask = load_image(folder.path(index, "file_name"), 1), load_mask(folder.path(index, "mask_file_name"))
            views.append((Path(name).name, outlined(image, mask > 0)))
    return views


def overlay_views(output_dir: Path, results: list[dict], fraction: float) -> str:
    """Each arm's (seed 0) predictions, cyan, on the same test images with their masks, red."""
    from medaug.data import load_image, load_mask
    from medaug.lowdata.study import _overlay_items
    from medaug.report import outlined
    from medaug.segmentation.inputs import load_study_data

    from medaug.lowdata.study import Arm

    subset = output_dir / "subsets" / "d0" / subset_name(fraction)
    items = _overlay_items(load_study_data("seg", subset, check_images=False).test)
    blocks = []
    for result in results:
        if result["real_fraction"] != fraction or result["seed"] != 0 or result.get("draw", 0) != 0:
            continue
        name = result["arm"] + (f" ({result['generator']})" if result["generator"] else "")
        key = Arm(result["arm"], result["generator"], fraction).key
        predictions = np.load(output_dir / "runs" / f"d0_{key}_s0" / "overlay_predictions.npz")["masks"]
        views = [(f"{name}: {Path(item['file_name']).name}",
                  outlined(load_image(item["image"], 1), load_mask(item["mask"]) > 0, 128, prediction))
                 for item, prediction in zip(items, predictions)]
        blocks.append(f"<h3>{html.escape(name)}</h3>{_thumbs(views)}")
    return "".join(blocks)


def render_html(output_dir: Path, summary: dict, results: list[dict], pairs: dict) -> str:
    from medaug.report import STYLE, _table

    fractions = sorted({row["real_fraction"] for row in summary["rows"]})
    shown = min(fractions, key=lambda f: abs(f - 0.25)) if fractions else None
    generator_table = _table([[f"d{g['draw']}", f"{g['real_fraction']:g}", g["generator"], str(g["generated"]),
                               str(g["kept"]),
                               f"{g['fidelity_ratio']:.2f}", f"{g['fidelity_synthetic_dice']:.3f}",
                               f"{g['fidelity_real_dice']:.3f}",
                               "–" if g["filter"] is None else f"{g['filter']['acceptance']:.0%} "
                                                               f"(Dice ≥ {g['filter']['threshold']:.2f})"]
                              for g in summary["generators"]],
                             ["draw", "real fraction", "generator", "pairs", "kept", "fidelity ratio", "synthetic Dice",
                              "real test Dice", "filter acceptance"])
    pair_blocks = "".join(
        f"<h3>{html.escape(subset_name(f))} {html.escape(g)}</h3>"
        f"{_thumbs(pair_views(output_dir / 'synthetic' / 'd0' / subset_name(f) / g, record['kept']))}"
        for (draw, f, g), record in pairs.items() if f == shown and draw == 0)
    body = [
        "<h1>medaug low-data segmentation study</h1>",
        (f"<p>Test Dice on the real test split, mean over seeds [{html.escape(INTERVALS)}]. "
         f"{html.escape(summary['equal_steps'])}. Each generator learned from its subset only. "
         f"{html.escape(validation_sentence(summary))}</p>"),
        _table(table_rows(summary), HEADER),
        f'<h2>Dice against real fraction</h2><img src="{dice_plot(summary)}" alt="Dice against real fraction">',
        ("<h2>Has real-only finished learning?</h2><p>Validation Dice of the real-only arm over its training (dotted: "
         "where it levelled): a gain counts only against a real-only arm that has stopped improving. "
         f"{html.escape(' '.join(plateau_text(summary)))}</p>"),
        f'<img src="{learning_curve_plot(results)}" alt="real-only learning curve">',
        "<h2>Generators: label fidelity and filter</h2>", generator_table,
        f'<img src="{fidelity_plot(pairs)}" alt="label fidelity distribution">',
        f"<h2>Generated pairs ({html.escape(subset_name(shown)) if shown else ''}; mask in red)</h2>", pair_blocks,
        (f"<h2>Predictions on the same test images ({html.escape(subset_name(shown)) if shown else ''}; "
         "mask red, prediction cyan)</h2>"), overlay_views(output_dir, results, shown) if shown is not None else "",
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>medaug study</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")
