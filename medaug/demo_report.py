"""`OUT/report.html` of `medaug demo`: every stage's result on one page, linking to its folder.

Generated images are shown beside the real image whose mask they were made for, with the mask outlined on
both, so a reader sees at a glance whether the anatomy was followed. Images and plots are embedded (base64 PNG),
so the page shows them with nothing beside it; the links to stage folders are relative, so the whole output
folder can be moved or zipped.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from medaug.report import STYLE, outlined, png_data_uri
from medaug.report_numbers import kid_text, mean_spread, p_text, with_interval

THUMBNAIL = 128
PAIRS_SHOWN = 8
EXTRA_STYLE = """
.pairs { display: grid; grid-template-columns: repeat(4, auto); gap: 10px 24px; }
.pairs figure { margin: 0; display: inline-flex; gap: 4px; align-items: flex-start; }
.pairs img { width: 128px; height: 128px; }
img.wide { max-width: 100%; image-rendering: pixelated; }
"""


def _figure(image: np.ndarray, mask: np.ndarray | None, caption: str) -> str:
    return (f'<img src="{png_data_uri(outlined(image, mask, THUMBNAIL))}" alt="{html.escape(caption)}" '
            f'title="{html.escape(caption)}">')


def pairs_html(dataset: Path, synthetic: Path, count: int = PAIRS_SHOWN) -> str:
    """Real source image | generated image, each with the (shared) mask outlined."""
    from medaug.data import DatasetFolder, load_image, load_mask
    from medaug.data.manifest import read_manifest

    entries = [entry for entry in read_manifest(synthetic) if entry.source_file_name][:count]
    if not entries:
        return "<p>No generated images.</p>"
    folder = DatasetFolder(dataset)
    rows = {folder.value(i, "file_name"): i for i in range(len(folder))}
    cells = []
    for entry in entries:
        row = rows[entry.source_file_name]
        real_mask_path = folder.path(row, "mask_file_name")
        real = _figure(load_image(folder.path(row, "file_name"), 1), load_mask(real_mask_path) if real_mask_path
                       else None, f"real: {entry.source_file_name}")
        mask = load_mask(synthetic / entry.mask_file_name) if entry.mask_file_name else None
        generated = _figure(load_image(synthetic / entry.file_name, 1), mask, f"generated: {entry.file_name}")
        cells.append(f"<figure>{real}{generated}</figure>")
    return ('<p class="note">Each pair: a real training image (left) and an image generated for its mask '
            '(right); the red line is the mask boundary on both.</p>'
            f'<div class="pairs">{"".join(cells)}</div>')


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _link(output_dir: Path, target: str | Path, text: str | None = None) -> str:
    target = Path(target)
    relative = target.relative_to(output_dir) if target.is_absolute() and target.is_relative_to(output_dir) else target
    href = relative.as_posix() + ("/" if (output_dir / relative).is_dir() else "")
    return f'<a href="{html.escape(href)}">{html.escape(text or href)}</a>'


def _latest_image(folder: Path) -> str:
    grids = sorted(folder.glob("validation/step-*.png"))
    if not grids:
        return ""
    from PIL import Image

    pixels = np.asarray(Image.open(grids[-1]).convert("RGB"), dtype=np.float32) / 255.0
    return (f'<p class="note">Validation samples at the last step ({html.escape(grids[-1].name)}).</p>'
            f'<img class="wide" src="{png_data_uri(pixels)}" alt="validation grid" '
            f'style="width:{min(4 * THUMBNAIL, pixels.shape[1] * 2)}px">')


def stage_table(output_dir: Path, records: dict) -> str:
    folders = {"data": "data", "base": "base", "vae": "base/vae", "segmenter": "consistency_segmenter",
               "finetune": "finetune", "controlnet": "controlnet",
               "generate": "synthetic", "evaluate": "evaluate", "segmentation": "segmentation"}
    rows = []
    total = 0.0
    for name, record in records.items():
        total += record["seconds"]
        folder = folders.get(name)
        link = _link(output_dir, output_dir / folder, folder + "/") if folder and (output_dir / folder).exists() else ""
        rows.append([html.escape(record["title"]), f"{record['seconds']:.0f}", link])
    rows.append(["<b>total</b>", f"<b>{total:.0f}</b>", ""])
    return _table(["stage", "seconds", "outputs"], rows)


def training_section(output_dir: Path, name: str, result: dict) -> str:
    return (f"<p>{result['steps']} steps at {_number(result['steps_per_second'], 2)} steps/s; loss "
            f"{_number(result['loss_first'], 4)} (first tenth) → {_number(result['loss_last'], 4)} (last tenth). "
            f"Output folder: {_link(output_dir, output_dir / name, name + '/')}.</p>{_latest_image(output_dir / name)}")


def vae_section(result: dict) -> str:
    before, after = result["before_training"], result["after_training"]
    rows = [[metric.upper(), f"{before[metric]['mean']:.3f}",
             mean_spread(after[metric]["mean"], after[metric].get("std", float("nan")))] for metric in ("psnr", "ssim")]
    return (f"<p>{result['steps']} steps; reconstruction of {result['test_images']} test images.</p>"
            + _table(["metric", "before training", "after training"], rows))


def evaluate_section(output_dir: Path, result: dict) -> str:
    metrics = result["metrics"]
    rows = [["Fréchet distance (domain encoder)", _number(metrics["frechet_distance"], 2)],
            ["KID (mean ± std over subsets)", kid_text(metrics["kid_mean"], metrics["kid_std"])],
            *[[key, _number(metrics[key])] for key in ("precision", "recall", "density", "coverage")],
            ["MS-SSIM within real / within synthetic (lower is more diverse)",
             f"{_number(result['diversity']['real'])} / {_number(result['diversity']['synthetic'])}"],
            ["near-copies of training images", f"{result['near_copies']} of {result['synthetic_images']}"],
            *fidelity_rows(result.get("label_fidelity"))]
    return (_table(["metric (real train vs synthetic)", "value"], rows)
            + f"<p>Full report: {_link(output_dir, result['report'], 'evaluate/report.html')}.</p>")


def fidelity_rows(fidelity: dict | None) -> list[list[str]]:
    """Label fidelity beside the realism metrics: whether generated images show their masks."""
    if not fidelity or "skipped" in fidelity:
        return [["label fidelity", f"not scored: {(fidelity or {}).get('skipped', 'not computed')}"]]
    return [["label fidelity: segmenter Dice on synthetic pairs / on real test images (ratio)",
             f"{_number(fidelity['synthetic_dice'])} / {_number(fidelity['real_dice'])} "
             f"(<b>{_number(fidelity['ratio'], 2)}</b>)"],
            ["synthetic pairs whose lesion the segmenter finds (Dice > 0.5)",
             f"{fidelity['share_above_0_5']:.0%} of {fidelity['pairs']}"]]


def segmentation_section(output_dir: Path, result: dict, fidelity: dict | None = None) -> str:
    rows = []
    for group in result["groups"]:
        dice = group["metrics"]["dice"]
        paired = group["paired_vs_real"].get("dice")
        rows.append([html.escape(group["arm"]), f"{group['n_train_real']} + {group['n_train_synthetic']}",
                     len(group["seeds"]), with_interval(dice["mean"], dice.get("ci_low"), dice.get("ci_high")),
                     _difference(paired)])
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in result["notes"])
    plots = "".join(f'<img class="wide" src="{png_data_uri(_pixels(path))}" alt="{html.escape(path.stem)}">'
                    for path in sorted((output_dir / "segmentation").glob("*.png"))[:2])
    readable = ""
    if fidelity and "skipped" not in fidelity:
        readable = (f"<p>The synthetic pairs' label fidelity is {_number(fidelity['ratio'], 2)} (a segmenter trained on "
                    f"real images finds their lesions with Dice {_number(fidelity['synthetic_dice'])}, real test "
                    f"lesions with {_number(fidelity['real_dice'])}): pairs that do not show their mask teach the "
                    "segmenter wrong labels.</p>")
    return (_table(["arm", "train images (real + synthetic)", "seeds",
                    "Dice on the real test split (mean [95% bootstrap interval over seeds and test images])",
                    "Δ Dice vs real-only [interval] (Wilcoxon p, verdict)"], rows) + readable
            + (f"<ul class='note'>{notes}</ul>" if notes else "") + plots
            + f"<p>Table with IoU and HD95: {_link(output_dir, result['results'], 'segmentation/results.md')}"
            + _bench_page(output_dir, Path(result["results"]).parent / "report.html") + ".</p>")


def _bench_page(output_dir: Path, page: Path) -> str:
    if not page.is_file():
        return ""
    return "; each arm's predictions on test images: " + _link(output_dir, page, "segmentation/report.html")


def _difference(paired: dict | None) -> str:
    if not paired:
        return "–"
    text = with_interval(paired["mean_difference"], paired.get("ci_low"), paired.get("ci_high"), signed=True)
    return f"{text} (p {p_text(paired['p_value'])}, {html.escape(paired.get('verdict', '–'))})"


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def controlnet_section(output_dir: Path, result: dict) -> str:
    if "skipped" in result:
        return f"<h2>ControlNet</h2><p>Not trained: {html.escape(result['skipped'])}.</p>"
    return "<h2>ControlNet on mask edges</h2>" + training_section(output_dir, "controlnet", result)


def validation_note(data: dict) -> str:
    """Where the val rows came from, when the demo carved them (demos recorded before the carve have no entry)."""
    validation = data.get("validation") or {}
    return f"; {html.escape(validation['text'])}" if validation.get("train_rows_before") else ""


def write_demo_report(demo, records: dict) -> Path:
    output_dir = demo.output_dir
    data = records["data"]["result"]
    source = "a phantom dataset made by the demo" if data["phantom"] else html.escape(data["dataset"])
    sections = [
        f"<h1>medaug demo</h1><p>Data: {source} ({data['splits']['train']} train, {data['splits']['val']} val, "
        f"{data['splits']['test']} test){validation_note(data)}. Model: the <code>{html.escape(demo.settings.preset)}"
        f"</code> preset from scratch at {demo.settings.resolution} px. Every number below is on this machine, this "
        "run.</p>",
        "<h2>Stages</h2>" + stage_table(output_dir, records),
        "<h2>Real and generated</h2>" + pairs_html(demo.dataset, output_dir / "synthetic"),
        "<h2>VAE</h2>" + vae_section(records["vae"]["result"]),
        "<h2>Fine-tuning on label prompts" + (" and masks" if demo.settings.generator == "mask_channels" else "")
        + "</h2>" + training_section(output_dir, "finetune", records["finetune"]["result"]),
        controlnet_section(output_dir, records["controlnet"]["result"]),
        f"<h2>Generation</h2><p>{records['generate']['result']['total']} images at "
        f"{_number(records['generate']['result']['images_per_second'], 2)} images/s, in "
        f"{_link(output_dir, output_dir / 'synthetic', 'synthetic/')} with masks and manifest.jsonl.</p>",
        "<h2>Quality</h2>" + evaluate_section(output_dir, records["evaluate"]["result"]),
        "<h2>Does it help segmentation?</h2>" + segmentation_section(
            output_dir, records["segmentation"]["result"], records["evaluate"]["result"].get("label_fidelity")),
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>medaug demo</title>"
            f"<style>{STYLE}{EXTRA_STYLE}</style></head><body>{''.join(sections)}</body></html>")
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
