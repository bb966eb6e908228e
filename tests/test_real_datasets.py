"""The dataset layer on the real datasets in ../shared/datasets (skipped where that folder is absent)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medaug.data import DatasetFolder, MedicalImageDataset, load_image, load_mask, summarize
from tests.conftest import shared_dataset


def test_busi_rows_splits_and_masks():
    root = shared_dataset("busi")
    folder = DatasetFolder(root)
    assert len(folder) == 780
    assert [len(folder.indices(split)) for split in ("train", "val", "test")] == [546, 78, 156]
    scan = folder.check()
    summary = summarize(folder, scan)
    assert summary["with_mask"] == 780
    assert {label: sum(counts.values()) for label, counts in summary["labels"].items()} == {
        "benign": 437, "malignant": 210, "normal": 133}
    assert summary["mask_coverage"]["empty"] == 133  # normal cases have empty masks
    assert max(summary["image_sizes"]["width"][1], summary["image_sizes"]["height"][1]) == 384


def assert_masks_follow_their_images(root, split, count=6):
    """Masks after `pad` resizing keep their coverage and centroid, computed from the original files."""
    resolution = 64
    dataset = MedicalImageDataset(root, split=split, resolution=resolution, channels=1, with_masks=True,
                                  validate=False)
    checked = 0
    for position, index in enumerate(dataset.indices):
        mask_path = dataset.folder.path(index, "mask_file_name")
        original = load_mask(mask_path) if mask_path is not None else None
        if original is None or not original.any():
            continue
        image = load_image(dataset.folder.path(index, "file_name"), channels=1)
        assert image.shape[:2] == original.shape
        sample = dataset[position]
        assert sample["pixel_values"].shape == (1, resolution, resolution)
        resized = sample["mask"][0].numpy() > 0
        height, width = original.shape
        scale = resolution / max(height, width)
        expected_coverage = original.mean() * height * width * scale**2 / resolution**2
        assert abs(resized.mean() - expected_coverage) < 0.02
        rows, cols = np.nonzero(original)
        offset = ((resolution - round(height * scale)) // 2, (resolution - round(width * scale)) // 2)
        expected_centre = np.array([rows.mean() * scale + offset[0], cols.mean() * scale + offset[1]])
        new_rows, new_cols = np.nonzero(resized)
        assert np.abs(np.array([new_rows.mean(), new_cols.mean()]) - expected_centre).max() < 1.5
        checked += 1
        if checked == count:
            break
    assert checked == count


def test_busi_masks_stay_aligned_through_the_dataset():
    assert_masks_follow_their_images(shared_dataset("busi"), "test")


def test_covid_rows_masks_and_splits_by_patient():
    """The fixed collection (five train rows that repeated val/test images removed) checks clean."""
    root = shared_dataset("covid_cxr")
    folder = DatasetFolder(root)
    assert len(folder) == 384
    assert [len(folder.indices(split)) for split in ("train", "val", "test")] == [261, 45, 78]
    scan = folder.check()  # raises DatasetError listing every problem, duplicates across splits included
    assert scan.problems == []
    summary = summarize(folder, scan)
    assert summary["with_mask"] == 210
    assert summary["mask_coverage"]["masks_read"] == 210
    table = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    assert table.groupby("patient_id")["split"].nunique().max() == 1  # no patient in two splits
    assert not {"339", "340"} & set(table["patient_id"])  # the duplicated patients' rows are gone


def test_covid_masks_stay_aligned_through_the_dataset():
    assert_masks_follow_their_images(shared_dataset("covid_cxr"), "train")
