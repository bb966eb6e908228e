"""report.html is self-contained and, rendered by headless Chromium, really shows its images."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app

WINDOW = (1400, 2600)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")


def screenshot(html: Path, png: Path) -> np.ndarray:
    """Render a file:// page with a fresh profile and no network, and return its pixels (H, W, 3)."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                   html.resolve().as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-800:]}"
    keep = os.environ.get("MEDAUG_SCREENSHOT_DIR")  # to look at them: MEDAUG_SCREENSHOT_DIR=/some/folder pytest ...
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / f"{html.parent.name}-{png.name}")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def dark_fraction(pixels: np.ndarray) -> float:
    """Share of pixels darker than text anti-aliasing leaves in bulk: the phantoms' speckle."""
    return float((pixels.max(axis=2) < 90).mean())


def coloured_pixels(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(pixels - np.array(colour)).max(axis=2) < 40).sum())


@pytest.fixture(scope="module")
def report(phantom_dir, tiny_model_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(app, ["evaluate", "--real", str(phantom_dir), "--synthetic", str(phantom_dir),
                                      "--synthetic_split", "test", "--model_path", str(tiny_model_dir),
                                      "--output_dir", str(output), "--kid_subsets", "5", "--diversity_pairs", "3",
                                      "--nearest_k", "2"])
    assert result.exit_code == 0, result.output
    return output / "report.html"


def test_report_is_self_contained(report):
    text = report.read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    # every real train image (14, of up to 16 shown), 4 synthetic, the PCA plot, the label-fidelity histogram,
    # the worst pairs outlined (all 4 synthetic phantoms hold a lesion), and the clean audit's 4 closest pairs
    assert len(sources) == 14 + 4 + 1 + 1 + 4 + 2 * 4
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "extractor <b>hf</b>" in text and "normalised with the image processor" in text


def test_report_renders_its_images_in_headless_chromium(report, tmp_path):
    shown = screenshot(report, tmp_path / "report.png")
    # Control: the same page with every image emptied renders text and tables only.
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', report.read_text()))
    control = screenshot(blank, tmp_path / "blank.png")
    assert shown.shape == control.shape == (WINDOW[1], WINDOW[0], 3)
    assert dark_fraction(shown) > 0.03, "the image grids do not appear"
    assert dark_fraction(shown[:700]) > 5 * dark_fraction(control[:700])
    # The grids sit side by side: dark speckle both left (real) and right of the page's middle (synthetic).
    top = shown[:700]
    assert dark_fraction(top[:, :500]) > 0.05 and dark_fraction(top[:, 560:1100]) > 0.02
    speckle = top[:, :500][top[:, :500].max(axis=2) < 250]
    assert speckle.std() > 20  # textured images, not flat boxes
    # The PCA plot's markers (real blue, synthetic orange, drawn at alpha 0.6 over white) are on the page.
    blue, orange = (121, 173, 210), (255, 178, 110)
    assert coloured_pixels(shown, blue) > 30 and coloured_pixels(shown, orange) > 10
    assert coloured_pixels(control, blue) == 0


def test_report_puts_the_real_floor_beside_each_metric_and_explains_ms_ssim(report):
    text = report.read_text()
    metrics = json.loads((report.parent / "metrics.json").read_text())
    floor = metrics["features"]["real_floor"]
    assert floor["real_images"] == floor["synthetic_images"] == 7  # two halves of the 14 real train images
    assert floor["frechet_distance"] > 0 and "disjoint random halves" in floor["description"]
    assert "<th>real vs real (floor)</th>" in text and "real vs real (floor)</td>" in text
    assert "Pure noise scores lowest, so compare the synthetic value with the real-vs-real value" in text
    assert "e-1" not in text.split("<h2>Distribution metrics")[1]  # no raw '± 1e-16' style numbers
    assert "closest pairs, so you can see how far apart" in text and text.count('class="pair"') == 4


def test_closest_pairs_of_a_clean_audit_render_in_chromium(report, tmp_path):
    shown = screenshot(report, tmp_path / "evaluate.png")
    text = report.read_text()
    audit = text.index("<h2>Memorisation audit")
    pairs_only = text[:audit] + re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', text[audit:])
    blank = tmp_path / "blank.html"
    blank.write_text(pairs_only)
    control = screenshot(blank, tmp_path / "blank.png")
    # The pairs lie below the grids, tables and PCA plot: compare the page's lower part with and without them.
    lower = slice(WINDOW[1] // 2, None)
    assert dark_fraction(shown[lower]) > 2 * dark_fraction(control[lower]) + 0.002, "the closest pairs do not appear"


def test_the_demo_report_embeds_its_segmentation_plots_and_writes_intervals(tmp_path):
    from medaug.demo_report import segmentation_section

    folder = tmp_path / "segmentation"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), (31, 119, 180), np.uint8)).save(folder / "dice_vs_ratio.png")
    (folder / "results.md").write_text("|")
    paired = {"mean_difference": 0.04, "ci_low": -0.01, "ci_high": 0.09, "p_value": 0.03,
              "verdict": "no clear difference"}
    groups = [{"arm": "real", "n_train_real": 8, "n_train_synthetic": 0, "seeds": [0, 1], "paired_vs_real": {},
               "metrics": {"dice": {"mean": 0.225, "ci_low": 0.0, "ci_high": 0.74, "ci95": 0.514}}},
              {"arm": "real+synthetic", "n_train_real": 8, "n_train_synthetic": 8, "seeds": [0, 1],
               "paired_vs_real": {"dice": paired},
               "metrics": {"dice": {"mean": 0.265, "ci_low": 0.1, "ci_high": 0.5, "ci95": 0.3}}}]
    text = segmentation_section(tmp_path, {"groups": groups, "notes": [], "results": str(folder / "results.md")})
    assert 'src="segmentation/' not in text and text.count('src="data:image/png;base64,') == 1
    assert "0.23 [0.00, 0.74]" in text and "± 0.514" not in text
    assert "+0.040 [−0.010, +0.090] (p 0.030, no clear difference)" in text
