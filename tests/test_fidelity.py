"""Label fidelity: a segmenter trained on real images reads synthetic (image, mask) pairs. Real images as their
own 'synthetic' pairs score a ratio of 1, shuffled masks score near 0, empty masks are left out, and `medaug
evaluate` writes the numbers, the manifest scores and the report section."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import DatasetFolder, ManifestEntry, append_manifest, read_manifest
from medaug.metrics.fidelity import FidelitySegmenter, label_fidelity, train_fidelity_segmenter


QUADRANTS = ((0.27, 0.27), (0.27, 0.73), (0.73, 0.73), (0.73, 0.27))


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """Phantom images whose lesion sits in quadrant (row number mod 4), so neighbouring rows' lesions never
    overlap; 64 rows, enough for a segmenter to learn the dark lesions in seconds."""
    import cv2

    from medaug.data.phantom import lesion_mask, phantom_image

    root = tmp_path_factory.mktemp("fidelity") / "real"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for number in range(64):
        kind = ("round", "irregular")[number % 2]
        mask = lesion_mask(kind, 64, rng)
        centre = np.argwhere(mask).mean(axis=0)
        target = np.array(QUADRANTS[number % 4]) * 64
        mask = np.roll(mask, tuple(np.round(target - centre).astype(int)), axis=(0, 1))
        name = f"{kind}_{number:03d}.png"
        cv2.imwrite(str(root / "images" / name), phantom_image(mask, rng))
        cv2.imwrite(str(root / "masks" / name), mask.astype(np.uint8) * 255)
        split = "test" if number % 8 in (2, 7) else "val" if number % 16 == 5 else "train"
        rows.append({"file_name": f"images/{name}", "mask_file_name": f"masks/{name}", "label": kind,
                     "split": split})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture(scope="module")
def segmenter(real_dir, tmp_path_factory):
    trained = train_fidelity_segmenter(real_dir, resolution=64, epochs=25, seed=0, batch_size=8)
    trained.save(tmp_path_factory.mktemp("segmenter"))
    return trained


def synthetic_copy(real_dir, target, split="test", shuffle_masks=False, empty_first=False):
    """The real rows of `split` as a synthetic folder (with a manifest), masks optionally shifted by one row."""
    folder = DatasetFolder(real_dir)
    rows = folder.indices(split)
    (target / "images").mkdir(parents=True)
    (target / "masks").mkdir()
    masks = [folder.path(i, "mask_file_name") for i in rows]
    if shuffle_masks:
        masks = masks[1:] + masks[:1]  # each image gets its neighbour's mask
    records = []
    for number, (row, mask) in enumerate(zip(rows, masks)):
        image_name, mask_name = f"images/{number:03d}.png", f"masks/{number:03d}.png"
        shutil.copyfile(folder.path(row, "file_name"), target / image_name)
        shutil.copyfile(mask, target / mask_name)
        if empty_first and number == 0:
            from PIL import Image

            size = Image.open(mask).size
            Image.fromarray(np.zeros(size[::-1], dtype=np.uint8)).save(target / mask_name)
        records.append({"file_name": image_name, "mask_file_name": mask_name, "label": folder.value(row, "label"),
                        "split": "train"})
        append_manifest(target, ManifestEntry(file_name=image_name, mask_file_name=mask_name, seed=number,
                                              model_dir="runs/x"))
    pd.DataFrame(records).to_csv(target / "metadata.csv", index=False)
    return target


def test_real_images_as_their_own_pairs_score_a_ratio_of_one(segmenter, real_dir, tmp_path):
    assert segmenter.info.real_dice > 0.5, segmenter.info  # it learned the lesions at all
    result = label_fidelity(segmenter, synthetic_copy(real_dir, tmp_path / "same"))
    assert result["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert result["synthetic_dice"] == pytest.approx(result["real_dice"], abs=1e-6)
    assert result["pairs"] == result["real_pairs"] > 0


def test_shuffled_masks_score_near_zero(segmenter, real_dir, tmp_path):
    result = label_fidelity(segmenter, synthetic_copy(real_dir, tmp_path / "shuffled", shuffle_masks=True))
    assert result["ratio"] < 0.1 and result["share_above_0_5"] == 0.0


def test_a_pair_with_an_empty_mask_is_left_out(segmenter, real_dir, tmp_path):
    result = label_fidelity(segmenter, synthetic_copy(real_dir, tmp_path / "empty", empty_first=True))
    whole = label_fidelity(segmenter, synthetic_copy(real_dir, tmp_path / "whole"))
    assert result["empty_mask_pairs"] == 1 and result["pairs"] == whole["pairs"] - 1
    assert result["per_pair"][0]["lesion"] is False and result["per_pair"][0]["dice"] is None


def test_a_saved_segmenter_reloads_and_scores_the_same(segmenter, real_dir, tmp_path):
    saved = segmenter.save(tmp_path / "saved")
    again = FidelitySegmenter.load(saved)
    folder = synthetic_copy(real_dir, tmp_path / "pairs", shuffle_masks=True)
    assert label_fidelity(again, folder)["per_pair"] == label_fidelity(segmenter, folder)["per_pair"]
    with pytest.raises(FileNotFoundError, match="--fidelity_segmenter: .* holds no fidelity_segmenter.json"):
        FidelitySegmenter.load(tmp_path)


def test_evaluate_writes_label_fidelity_to_metrics_manifest_and_report(segmenter, real_dir, tiny_model_dir,
                                                                       tmp_path):
    synthetic = synthetic_copy(real_dir, tmp_path / "synthetic", split="val", shuffle_masks=True)
    saved = segmenter.save(tmp_path / "segmenter")
    output = tmp_path / "evaluate"
    result = CliRunner().invoke(app, [str(arg) for arg in (
        "evaluate", "--real", real_dir, "--synthetic", synthetic, "--output_dir", output, "--model_path",
        tiny_model_dir, "--fidelity_segmenter", saved, "--kid_subsets", "4", "--diversity_pairs", "2",
        "--nearest_k", "2")])
    assert result.exit_code == 0, result.output
    fidelity = json.loads((output / "metrics.json").read_text())["label_fidelity"]
    assert set(fidelity) >= {"synthetic_dice", "real_dice", "ratio", "share_above_0_5", "pairs"}
    entries = read_manifest(synthetic)
    by_name = {pair["file_name"]: pair["dice"] for pair in fidelity["per_pair"]}
    assert fidelity["manifest_lines_updated"] == len(entries) > 0
    assert all(entry.extra["label_fidelity_dice"] == by_name[entry.file_name] for entry in entries)
    report = (output / "report.html").read_text()
    assert "Label fidelity" in report and "Pairs that show their mask worst" in report
    assert (output / "fidelity.png").is_file() and "label fidelity" in " ".join(result.output.split())


def test_evaluate_without_masks_says_why_fidelity_was_not_scored(real_dir, tiny_model_dir, tmp_path):
    synthetic = synthetic_copy(real_dir, tmp_path / "synthetic", split="train")
    table = pd.read_csv(synthetic / "metadata.csv").drop(columns=["mask_file_name"])
    table.to_csv(synthetic / "metadata.csv", index=False)
    output = tmp_path / "evaluate"
    result = CliRunner().invoke(app, [str(arg) for arg in (
        "evaluate", "--real", real_dir, "--synthetic", synthetic, "--output_dir", output, "--model_path",
        tiny_model_dir, "--kid_subsets", "4", "--diversity_pairs", "2", "--nearest_k", "2")])
    assert result.exit_code == 0, result.output
    fidelity = json.loads((output / "metrics.json").read_text())["label_fidelity"]
    assert fidelity == {"skipped": "the synthetic images have no masks"}
