"""`report.html` of `medaug evaluate`: one self-contained file (images embedded as base64 PNG).

It opens from an e-mail attachment or an air-gapped share with nothing beside it: real and synthetic grids
side by side, the metric tables headed by the extractor and preprocessing that produced them, the PCA plot
and the memorisation audit's near-copies shown next to their nearest training images.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from medaug.data import fit_square
from medaug.files import write_text_atomic
from medaug.report_numbers import kid_text, mean_spread, plain

MAX_PAIRS_SHOWN = 24
CLOSEST_PAIRS_SHOWN = 4  # a clean audit still shows its closest pairs, so a reader sees why it is clean
MS_SSIM_MEANING = ("MS-SSIM between pairs of images of one set: lower means more diverse. Pure noise scores lowest, "
                   "so compare the synthetic value with the real-vs-real value, not with 0.")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
.sets { display: flex; gap: 24px; flex-wrap: wrap; }
.grid { display: grid; grid-template-columns: repeat(4, 128px); gap: 4px; }
.grid img, .pair img { width: 128px; height: 128px; display: block; }
.pair { display: inline-flex; gap: 4px; margin: 6px 12px 6px 0; align-items: flex-start; }
.caption { font-size: 11px; max-width: 128px; overflow-wrap: anywhere; }
.note { font-size: 12px; color: #555; }
"""


def png_data_uri(image: np.ndarray) -> str:
    """A data: URI of an (H, W[, C]) float image in [0, 1]."""
    pixels = np.clip(np.asarray(image) * 255 + 0.5, 0, 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def outlined(image: np.ndarray, mask: np.ndarray | None, size: int = 128,
             prediction: np.ndarray | None = None, fit: str = "pad") -> np.ndarray:
    """(size, size, 3) grey thumbnail with the mask's boundary in red and a predicted mask's in cyan.

    `image` and `mask` are squared by `fit`; `prediction` is already square (a network's output at its resolution,
    made from the image squared the same way), so it is only resized."""
    from medaug.edges import mask_boundary

    grey = fit_square(image, size, fit)
    rgb = np.repeat(grey[:, :, :1], 3, axis=2).copy()
    for outline, colour, how in ((prediction, (0.1, 0.9, 0.9), "stretch"), (mask, (1.0, 0.15, 0.15), fit)):
        if outline is not None:
            edge = mask_boundary(fit_square(outline.astype(np.uint8), size, how, nearest=True)) > 0
            rgb[edge] = colour
    return rgb


def _thumbnail(image_set, position: int, channels: int, size: int) -> str:
    return png_data_uri(fit_square(image_set.load(position, channels), size, "pad"))


def _figure(image_set, position: int, channels: int, size: int, caption: str) -> str:
    return (f'<figure style="margin:0"><img src="{_thumbnail(image_set, position, channels, size)}" '
            f'alt="{html.escape(caption)}" title="{html.escape(caption)}">'
            f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>')


def image_grid(image_set, channels: int, count: int, size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    positions = sorted(rng.choice(len(image_set), size=min(count, len(image_set)), replace=False).tolist())
    names, labels = image_set.file_names, image_set.labels
    cells = [_figure(image_set, p, channels, size, Path(names[p]).name + (f" ({labels[p]})" if labels[p] else ""))
             for p in positions]
    return f'<div class="grid">{"".join(cells)}</div>'


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metric_rows(metrics: dict, floor: dict | None = None) -> list[list[str]]:
    """One row per metric: synthetic vs real, the real-vs-real floor beside it, what the number means."""
    floor = floor if floor and "skipped" not in floor else None

    def beside(key: str) -> str:
        return "–" if floor is None else plain(floor[key], 3)

    kid_floor = "–" if floor is None else kid_text(floor["kid_mean"], floor["kid_std"])
    return [
        ["Fréchet distance", plain(metrics["frechet_distance"], 3), beside("frechet_distance"), "lower is closer"],
        ["KID (mean ± std over subsets)", kid_text(metrics["kid_mean"], metrics["kid_std"]), kid_floor,
         f"unbiased MMD² (can fall below 0 by chance), {metrics['kid_subsets']} subsets of "
         f"{metrics['kid_subset_size']}"],
        ["precision", plain(metrics["precision"], 3), beside("precision"), f"fidelity, k={metrics['nearest_k']}"],
        ["recall", plain(metrics["recall"], 3), beside("recall"), "diversity relative to the real set"],
        ["density", plain(metrics["density"], 3), beside("density"), "about 1 when the sets match"],
        ["coverage", plain(metrics["coverage"], 3), beside("coverage"), "share of real images with a synthetic "
                                                                      "neighbour"],
    ]


def floor_note(floor: dict) -> str:
    if "skipped" in floor:
        return f'<p class="note">Real-vs-real floor not computed: {html.escape(floor["skipped"])}.</p>'
    return (f'<p class="note">Real vs real (floor): {html.escape(floor["description"])}. Synthetic images that '
            "match the real distribution score about this; the floor compares half-size sets, so its Fréchet "
            "distance sits somewhat above a full-size comparison.</p>")


def _label_table(per_label: dict) -> str:
    if not per_label:
        return '<p class="note">No label is held by both sets.</p>'
    rows = []
    for label, metrics in per_label.items():
        if "skipped" in metrics:
            rows.append([label, metrics["real_images"], metrics["synthetic_images"], "-", "-", "-", "-",
                         "skipped: " + metrics["skipped"]])
            continue
        rows.append([label, metrics["real_images"], metrics["synthetic_images"],
                     _number(metrics["frechet_distance"]), kid_text(metrics["kid_mean"], metrics["kid_std"]),
                     _number(metrics["precision"]), _number(metrics["recall"]),
                     f"density {metrics['density']:.3g}, coverage {metrics['coverage']:.3g}"])
    return _table(rows, ["label", "real", "synthetic", "Fréchet distance", "KID", "precision", "recall", "other"])


def _pairs(memorisation: dict, real, synthetic, channels: int, size: int) -> str:
    shown = memorisation["near_copies"][:MAX_PAIRS_SHOWN]
    if not shown:
        closest = sorted(memorisation["per_image"], key=lambda pair: pair["ratio"])[:CLOSEST_PAIRS_SHOWN]
        return ('<p class="note">No synthetic image is closer to a training image than the threshold. The '
                f'{len(closest)} closest pairs, so you can see how far apart even they are:</p>'
                + _pair_cells(closest, real, synthetic, channels, size))
    more = len(memorisation["near_copies"]) - len(shown)
    tail = f'<p class="note">{more} more listed in metrics.json.</p>' if more > 0 else ""
    return _pair_cells(shown, real, synthetic, channels, size) + tail


def _pair_cells(shown: list[dict], real, synthetic, channels: int, size: int) -> str:
    cells = []
    for pair in shown:
        synthetic_name, real_name = Path(pair["synthetic"]).name, Path(pair["nearest_real"]).name
        cells.append(
            '<div class="pair">'
            + _figure(synthetic, pair["synthetic_position"], channels, size, f"synthetic: {synthetic_name}")
            + _figure(real, pair["real_position"], channels, size, f"nearest real: {real_name}")
            + f'<div class="caption">ratio {pair["ratio"]:.3f}</div></div>')
    return "".join(cells)


def fidelity_section(fidelity: dict | None, figure_png: Path | None, worst: list[tuple[str, np.ndarray]]) -> str:
    """Label fidelity: the numbers, the distribution of per-pair Dice, and the pairs that show their mask worst."""
    if fidelity is None or "skipped" in fidelity:
        reason = fidelity["skipped"] if fidelity else "not computed"
        return f'<h2>Label fidelity</h2><p class="note">Not scored: {html.escape(reason)}.</p>'
    rows = [["synthetic Dice (each image against its own mask)", _number(fidelity["synthetic_dice"]),
             f"{fidelity['pairs']} pairs with a lesion; {fidelity['empty_mask_pairs']} with an empty mask left out"],
            ["real Dice (real test images)", _number(fidelity["real_dice"]), f"{fidelity['real_pairs']} images"],
            ["ratio", _number(fidelity["ratio"]), "about 1: generated pairs are as readable as real ones"],
            ["share of pairs above Dice 0.5", f"{fidelity['share_above_0_5']:.1%}", ""]]
    figure = ""
    if figure_png is not None and Path(figure_png).is_file():
        uri = "data:image/png;base64," + base64.b64encode(Path(figure_png).read_bytes()).decode("ascii")
        figure = f'<img src="{uri}" alt="Dice of synthetic pairs and of real test images" style="max-width:100%">'
    cells = "".join(f'<figure style="margin:0"><img src="{png_data_uri(image)}" alt="{html.escape(caption)}">'
                    f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>'
                    for caption, image in worst)
    return f"""<h2>Label fidelity</h2>
<p class="note">{html.escape(fidelity['description'])}. A synthetic pair whose image does not show its mask teaches a
segmenter a wrong label, whatever the distribution metrics say.</p>
{_table(rows, ['', 'value', ''])}
{figure}
<h3>Pairs that show their mask worst</h3>
<p class="note">Red: the mask the image was generated for. Cyan: where the segmenter finds the lesion.</p>
<div class="grid">{cells}</div>"""


def _sets_table(results: dict) -> str:
    rows = []
    for key in ("real", "synthetic"):
        item = results[key]
        labels = ", ".join(f"{k}: {v}" for k, v in item["labels"].items()) or "none"
        rows.append([key, item["flag"], item["folder"], item["split"], item["images"], labels])
    return _table(rows, ["set", "flag", "folder", "split", "images", "labels"])


def render_report(results: dict, real, synthetic, channels: int, pca_png: Path, grid_images: int,
                  thumbnail_size: int, seed: int, fidelity_html: str = "") -> str:
    features, diversity, memorisation = results["features"], results["diversity"], results["memorisation"]
    extractor = (f"extractor <b>{html.escape(features['extractor'])}</b> ({html.escape(features['source'])}); "
                 f"preprocessing: {html.escape(features['preprocessing'])}; {features['dimensions']} dimensions")
    pca = "data:image/png;base64," + base64.b64encode(Path(pca_png).read_bytes()).decode("ascii")
    diversity_rows = [[name, mean_spread(diversity[key]["ms_ssim_mean"], diversity[key]["ms_ssim_std"]),
                       diversity[key]["pairs"]]
                      for name, key in (("synthetic vs synthetic", "synthetic"), ("real vs real (floor)", "real"))]
    audit_rows = [["reference set", memorisation["reference"]], ["space", memorisation["description"]],
                  ["typical real-to-real distance", _number(memorisation["real_scale"])],
                  ["threshold (ratio)", _number(memorisation["threshold"])],
                  ["smallest / median ratio", f"{memorisation['ratio_min']:.3g} / {memorisation['ratio_median']:.3g}"],
                  ["near-copies", f"{memorisation['flagged_count']} ({memorisation['flagged_fraction']:.1%})"]]
    real_grid = image_grid(real, channels, grid_images, thumbnail_size, seed)
    synthetic_grid = image_grid(synthetic, channels, grid_images, thumbnail_size, seed)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medaug evaluate</title><style>{STYLE}</style></head>
<body>
<h1>medaug evaluate: synthetic vs real images</h1>
{_sets_table(results)}
<h2>Images</h2>
<div class="sets">
<div><h3>Real ({html.escape(results['real']['split'])})</h3>{real_grid}</div>
<div><h3>Synthetic</h3>{synthetic_grid}</div>
</div>
<h2>Distribution metrics</h2>
<p class="note">All numbers in this section: {extractor}. Compare them only with numbers from the same extractor.</p>
{_table(metric_rows(features['metrics'], features.get('real_floor')),
         ['metric', 'synthetic vs real', 'real vs real (floor)', 'meaning'])}
{floor_note(features.get('real_floor') or {"skipped": "not in this metrics.json"})}
<h3>Per label</h3>
{_label_table(features['per_label'])}
<h2>PCA of features</h2>
<p class="note">{extractor}</p>
<img src="{pca}" alt="PCA scatter of real and synthetic features" style="max-width:100%">
<h2>Diversity (MS-SSIM within a set)</h2>
<p><b>{html.escape(MS_SSIM_MEANING)}</b></p>
<p class="note">{html.escape(diversity['description'])}</p>
{_table(diversity_rows, ['pairs from', 'MS-SSIM mean ± std over pairs', 'pairs'])}
<h2>Memorisation audit</h2>
<p class="note">For each synthetic image: distance to its nearest real image over the median distance between
real images and their nearest other real image. A copy scores 0; below the threshold it is listed here.</p>
{_table(audit_rows, ['', ''])}
{_pairs(memorisation, real, synthetic, channels, thumbnail_size)}
{fidelity_html}
</body></html>
"""


def write_report(path: str | Path, results: dict, real, synthetic, channels: int, pca_png: Path,
                 grid_images: int = 16, thumbnail_size: int = 128, seed: int = 0, fidelity_html: str = "") -> Path:
    """Write the report to a temporary name, then rename, so a reader never sees half a file."""
    path = Path(path)
    return write_text_atomic(path, render_report(results, real, synthetic, channels, pca_png, grid_images,
                                                 thumbnail_size, seed, fidelity_html))
