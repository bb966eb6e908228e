"""`report.html` of `medaug bench`: the results table, the plots and each arm's predictions on a few test images,
on one self-contained page (every image a data: URI), so it reads from an e-mail attachment with nothing beside it.

Predictions are those of each group's first seed, saved by the run (`runs/<id>/overlay_predictions.npz`), on the
same test images for every arm; the ground truth is outlined in red, the prediction in cyan.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from medaug.segmentation.report import (INTERVAL_TEXT, PRIMARY_PAIRED, paired_text, plateau_text, settings_sentence,
                                        table_header, table_rows)

THUMBNAIL = 128
GRADCAM_SHOWN = 4
EXTRA_STYLE = """
img.plot { max-width: 100%; }
td { white-space: nowrap; }
.gradcam img { width: 128px; height: 128px; image-rendering: pixelated; }
"""


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figures(views: list[tuple[str, str]]) -> str:
    """A grid of (caption, data URI) thumbnails."""
    cells = [f'<figure style="margin:0"><img src="{uri}" alt="{html.escape(caption)}" title="{html.escape(caption)}">'
             f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>' for caption, uri in views]
    return f'<div class="grid">{"".join(cells)}</div>'


def _group_name(group: dict) -> str:
    name = group["arm"]
    if group["arm"] != "synthetic":
        name += f", real fraction {group['real_fraction']:g}"
    return name + (f", ratio {group['ratio']:g}" if group["ratio"] else "")


def _run_dir(output_dir: Path, group: dict) -> Path:
    from medaug.segmentation.study import Run

    run = Run(group["arm"], group["real_fraction"], group["ratio"], group["seeds"][0])
    return output_dir / "runs" / run.run_id


def overlay_block(output_dir: Path, group: dict, test_items: dict[str, dict], fit: str) -> str:
    """A group's first-seed predictions (cyan) over the ground truth (red) on the saved test images."""
    from medaug.data import load_image, load_mask
    from medaug.report import outlined, png_data_uri
    from medaug.segmentation.study import OVERLAY_FILE

    path = _run_dir(output_dir, group) / OVERLAY_FILE
    title = f"<h3>{html.escape(_group_name(group))} (seed {group['seeds'][0]})</h3>"
    if not path.is_file():
        return title + '<p class="note">No predictions saved (the run finished before reports showed them).</p>'
    with np.load(path) as saved:
        masks, names = saved["masks"], [str(name) for name in saved["file_names"]]
    views = []
    for name, prediction in zip(names, masks):
        item = test_items.get(name)
        if item is not None:
            image, truth = load_image(item["image"], 1), load_mask(item["mask"]) > 0
            views.append((Path(name).name, png_data_uri(outlined(image, truth, THUMBNAIL, prediction, fit))))
    return title + _figures(views)


def gradcam_block(output_dir: Path, group: dict) -> str:
    maps = sorted((_run_dir(output_dir, group) / "gradcam").glob("*.png"))[:GRADCAM_SHOWN]
    if not maps:
        return ""
    views = [(path.stem, file_data_uri(path)) for path in maps]
    return f"<h3>{html.escape(_group_name(group))}</h3><div class='gradcam'>{_figures(views)}</div>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pictures(output_dir: Path, summary: dict, data) -> str:
    """Segmentation: each group's predictions on the same test images; classification: Grad-CAM maps."""
    groups = summary["groups"]
    if summary["task"] == "seg":
        test_items = {item["file_name"]: item for item in data.test}
        blocks = "".join(overlay_block(output_dir, group, test_items, summary["settings"]["fit"]) for group in groups)
        return ("<h2>Predictions on the same test images</h2><p class='note'>Red: the ground-truth mask's outline. "
                "Cyan: the outline of the arm's predicted mask (first seed).</p>" + blocks)
    blocks = "".join(gradcam_block(output_dir, group) for group in groups)
    return "<h2>Grad-CAM (first seed)</h2>" + blocks if blocks else ""


def render_html(output_dir: Path, summary: dict, data) -> str:
    from medaug.report import STYLE

    output_dir = Path(output_dir)
    plots = "".join(f'<img class="plot" src="{file_data_uri(output_dir / name)}" alt="{html.escape(name)}">'
                    for name in summary["plots"])
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in summary["notes"])
    body = [
        f"<h1>medaug bench {html.escape(summary['task'])}: results</h1>",
        f"<p>{html.escape(settings_sentence(summary))} {html.escape(' '.join(plateau_text(summary)))}</p>",
        f"<p class='note'>{html.escape(INTERVAL_TEXT)} {html.escape(paired_text(PRIMARY_PAIRED[summary['task']]))}"
        "</p>",
        _table(table_header(summary), table_rows(summary)),
        f"<ul class='note'>{notes}</ul>" if notes else "",
        "<h2>Plots</h2>" + plots,
        pictures(output_dir, summary, data),
    ]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>medaug bench</title>"
            f"<style>{STYLE}{EXTRA_STYLE}</style></head><body>{''.join(body)}</body></html>")
