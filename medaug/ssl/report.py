"""`summary.json` and `report.html` of the self-supervised study: a table of method x policy, the spread of each
method across policies, the class counts beside them, a plot of every seed, and Grad-CAM maps per encoder."""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from medaug.files import plain_json, write_text_atomic

SCORES = ("auc", "accuracy", "macro_f1")
BASELINE_LABELS = {"supervised": "supervised\n({policy})", "random": "random init\n(no training)"}


def seed_interval(values: list[float]) -> dict:
    """Mean over seeds with a 95% percentile bootstrap interval over seeds, clipped to [0, 1] (every score here is
    bounded so), and the per-seed values; the interval is null for fewer than two seeds."""
    from medaug.segmentation.stats import bootstrap_interval

    finite = [value for value in values if value is not None and math.isfinite(value)]
    interval = bootstrap_interval(finite, bounds=(0.0, 1.0))
    bounded = len(finite) > 1 and math.isfinite(interval["ci_low"])
    return {"mean": interval["mean"], "low": interval["ci_low"] if bounded else None,
            "high": interval["ci_high"] if bounded else None, "n": len(finite), "values": values}


def summarise(results: list[dict], counts: dict, classes: list[str], settings, notes: list[str], validation) -> dict:
    """Rows per (method, policy, pool) with each score over seeds; each method's spread over policies."""
    from dataclasses import asdict

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        groups[(result["method"], result["policy"], result["pool"])].append(result)
    rows = [{"method": method, "policy": policy, "pool": pool,
             "augmentations": members[0]["augmentations"], "seeds": [m["seed"] for m in members],
             **{score: seed_interval([m["scores"][score] for m in members]) for score in SCORES}}
            for (method, policy, pool), members in groups.items()]
    train = counts["train"]
    return plain_json({
        "classes": classes, "class_counts": counts,
        "imbalance": max(train.values()) / max(1, min(train.values())),
        "rows": rows, "spread": _spread(rows), "notes": notes, "settings": asdict(settings),
        "validation": validation.record(),
    })


def _spread(rows: list[dict]) -> dict:
    """Per self-supervised method on the real pool: the best and worst policy by mean AUC, and the range and
    standard deviation of the policies' mean AUCs (how much the choice of augmentation matters)."""
    spread = {}
    for method in sorted({row["method"] for row in rows} - set(BASELINE_LABELS)):
        means = {row["policy"]: row["auc"]["mean"] for row in rows
                 if row["method"] == method and row["pool"] == "real" and math.isfinite(row["auc"]["mean"])}
        if means:
            values = np.array(list(means.values()))
            spread[method] = {"best_policy": max(means, key=means.get), "worst_policy": min(means, key=means.get),
                              "range": float(values.max() - values.min()), "std": float(values.std()),
                              "policies": len(means)}
    return spread


def _cell(interval: dict) -> str:
    if interval["mean"] is None or not math.isfinite(interval["mean"]):
        return "n/a"
    if interval["low"] is None:
        return f"{interval['mean']:.3f} (1 seed)"
    return f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def _results_table(summary: dict) -> str:
    header = "".join(f"<th>{name}</th>" for name in ("method", "policy", "pool", "augmentations", "seeds",
                                                     "AUC", "accuracy", "macro-F1"))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(value))}</td>" for value in (
            row["method"], row["policy"], row["pool"], " + ".join(row["augmentations"]), len(row["seeds"]),
            _cell(row["auc"]), _cell(row["accuracy"]), _cell(row["macro_f1"]))) + "</tr>"
        for row in sorted(summary["rows"], key=lambda r: (r["method"] in BASELINE_LABELS, r["method"], r["pool"],
                                                          -(r["auc"]["mean"] or 0))))
    return f"<table><tr>{header}</tr>{body}</table>"


def _counts_table(summary: dict) -> str:
    classes = summary["classes"]
    header = "<tr><th>split</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes) + "</tr>"
    body = "".join(f"<tr><td>{split}</td>" + "".join(f"<td>{counts[c]}</td>" for c in classes) + "</tr>"
                   for split, counts in summary["class_counts"].items())
    return f"<table>{header}{body}</table>"


def _spread_table(summary: dict) -> str:
    rows = "".join(f"<tr><td>{method}</td><td>{s['best_policy']}</td><td>{s['worst_policy']}</td>"
                   f"<td>{s['range']:.3f}</td><td>{s['std']:.3f}</td><td>{s['policies']}</td></tr>"
                   for method, s in summary["spread"].items())
    return ("<table><tr><th>method</th><th>best policy</th><th>worst policy</th><th>range of mean AUC</th>"
            f"<th>std of mean AUC</th><th>policies</th></tr>{rows}</table>")


def auc_plot(summary: dict) -> np.ndarray:
    """Test AUC of every seed (dots) and the mean (bar) per policy, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [row for row in summary["rows"] if row["pool"] == "real"]
    baselines = sorted({row["method"] for row in rows} & set(BASELINE_LABELS))
    groups = sorted({row["policy"] for row in rows if row["method"] not in BASELINE_LABELS}) + baselines
    methods = sorted({row["method"] for row in rows} - set(BASELINE_LABELS))
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4), dpi=100)
    width = 0.8 / max(1, len(methods))
    for row in rows:
        baseline = row["method"] in BASELINE_LABELS
        number = 0 if baseline else methods.index(row["method"])
        x = groups.index(row["method"] if baseline else row["policy"]) + (
            0 if baseline else (number - (len(methods) - 1) / 2) * width)
        colour = "grey" if baseline else f"C{number}"
        values = [v for v in row["auc"]["values"] if v is not None]
        axis.bar(x, row["auc"]["mean"], width * 0.9, color=colour, alpha=0.6,
                 label=None if baseline or row["policy"] != groups[0] else row["method"])
        axis.scatter([x] * len(values), values, color=colour, s=12, zorder=3)
    axis.set_xticks(range(len(groups)), [BASELINE_LABELS.get(group, group).format(
        policy=summary["settings"]["supervised_policy"]) for group in groups])
    axis.set_ylabel("test AUC (probe; supervised: its own head)")
    axis.set_ylim(0.0, 1.0)
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


def gradcam_grid(output_dir: Path, runs, data, count: int) -> str:
    """A row per encoder (first seed, real pool) of Grad-CAM overlays on the first `count` test images."""
    from safetensors.torch import load_file
    from torch import nn

    from medaug.metrics.encoder import DomainEncoder
    from medaug.report import png_data_uri
    from medaug.segmentation.train_cls import overlay
    from medaug.ssl.probe import Classifier, gradcam_maps

    images = data.images["test"][:count]
    if not len(images):  # --gradcam_images 0
        return ""
    first_seed = min(run.seed for run in runs)
    rows = []
    for run in (run for run in runs if run.seed == first_seed and run.pool == "real"):
        state = load_file(str(output_dir / "runs" / run.name / "model.safetensors"))
        encoder = DomainEncoder(in_channels=images.shape[1], resolution=images.shape[-1],
                                block_channels=tuple(saved_block_channels(state)))
        model = Classifier(encoder, nn.Linear(state["head.weight"].shape[1], state["head.weight"].shape[0]))
        model.load_state_dict(state)
        maps, predicted = gradcam_maps(model, images)
        cells = "".join(
            f"<figure><img src='{png_data_uri(overlay(image.numpy(), heat)[:, :, ::-1] / 255.0)}'>"
            f"<figcaption>true {html.escape(data.classes[data.labels['test'][i]])}, predicted "
            f"{html.escape(data.classes[predicted[i]])}</figcaption></figure>"
            for i, (image, heat) in enumerate(zip(images, maps)))
        rows.append(f"<div class='camrow'><div class='camname'>{html.escape(run.method)}<br>"
                    f"{html.escape(run.policy.name)}</div>{cells}</div>")
    return "".join(rows)


def saved_block_channels(state: dict) -> list[int]:
    """The backbone's block widths, read from the saved weights (layer1..layer4's first convolution)."""
    return [int(state[f"backbone.layer{k}.0.conv1.weight"].shape[0]) for k in range(1, 5)]


def write_report(output_dir: Path, summary: dict, runs, data, settings) -> Path:
    from medaug.report import STYLE, png_data_uri

    imbalance = summary["imbalance"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>medaug ssl study</title>
<style>{STYLE}
.camrow {{ display: flex; gap: 6px; align-items: center; margin: 4px 0; }}
.camrow img {{ width: 128px; height: 128px; display: block; }} figure {{ margin: 0; font-size: 11px; }}
.camname {{ width: 110px; font-size: 12px; }}</style></head><body>
<h1>Self-supervised pre-training: which augmentations help?</h1>
<p class="note">Encoders pre-trained on the unlabelled training images ({'CLAHE-equalised, ' if settings.clahe else ''}\
{settings.resolution} px), scored by a logistic-regression probe on frozen features; the supervised row trains the
same network with cross-entropy on the same labels, and the random row probes that network as initialised (the floor
a pre-trained encoder has to beat). Test split of the real data; mean over seeds with a 95% percentile
bootstrap interval over seeds (not test images), clipped to [0, 1].
Label column '{html.escape(settings.label_column)}'. Each probe's L2 penalty is selected on
{html.escape(summary['validation']['origin'])}.</p>
{"".join(f"<p class='note'><b>{html.escape(note)}</b></p>" for note in summary["notes"])}
<h2>Classes</h2>{_counts_table(summary)}
<p class="note">Imbalance in the training split: the largest class is {imbalance:.1f}x the smallest.</p>
<h2>Results</h2>{_results_table(summary)}
<h2>Spread across policies</h2>{_spread_table(summary)}
<h2>Test AUC per seed</h2><img src="{png_data_uri(auc_plot(summary))}">
<h2>Grad-CAM (first seed, predicted class)</h2>{gradcam_grid(output_dir, runs, data, settings.gradcam_images)}
</body></html>"""
    return write_text_atomic(output_dir / "report.html", page)
