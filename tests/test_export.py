"""`medaug export` and Hugging Face `imagefolder`: what export writes loads with its splits and masks as images, and
a folder in HF's split layout loads the same in HF `datasets` and in medaug."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import DatasetFolder, read_array
from medaug.data.export import export_imagefolder

runner = CliRunner()


@pytest.fixture
def load_imagefolder(tmp_path, monkeypatch):
    """`datasets.load_dataset("imagefolder", data_dir=...)`, offline, with its cache under tmp_path."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()

    def load(folder):
        return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "hf_cache"))

    return load


def save_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def pixels(seed, size=(12, 16)):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def mask_pixels(seed, size=(12, 16)):
    mask = np.zeros(size, dtype=np.uint8)
    mask[seed:seed + 4, 2:9] = 255
    return mask


def flat_dataset(root):
    """A medaug folder with a split column; the test row has no mask, so its split's mask column is empty."""
    rows = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        save_png(root / "images" / f"{i}.png", pixels(i))
        mask = f"masks/{i}.png" if split != "test" else ""
        if mask:
            save_png(root / mask, mask_pixels(i))
        rows.append({"file_name": f"images/{i}.png", "mask_file_name": mask, "text": f"scan {i}",
                     "label": "benign" if i % 2 else "malignant", "split": split})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def test_export_loads_in_hf_with_its_splits_and_masks_as_images(tmp_path, load_imagefolder):
    source = flat_dataset(tmp_path / "source")
    assert set(load_imagefolder(source)) == {"train"}  # what the issue saw: HF ignores the split column
    written = export_imagefolder(source, tmp_path / "hf")
    assert written == {"train": 2, "validation": 1, "test": 1}
    loaded = load_imagefolder(tmp_path / "hf")
    assert {split: len(rows) for split, rows in loaded.items()} == written
    first = loaded["train"][0]
    assert isinstance(first["image"], Image.Image) and isinstance(first["mask"], Image.Image)
    np.testing.assert_array_equal(np.array(first["image"]), pixels(0))
    np.testing.assert_array_equal(np.array(first["mask"]), mask_pixels(0))
    assert first["text"] == "scan 0" and first["label"] == "malignant" and "split" not in first
    validation = loaded["validation"][0]
    np.testing.assert_array_equal(np.array(validation["mask"]), mask_pixels(2))
    assert validation["text"] == "scan 2"
    assert loaded["test"][0]["mask"] is None and loaded["test"][0]["text"] == "scan 3"


def test_medaug_reads_its_own_export_back(tmp_path):
    source = flat_dataset(tmp_path / "source")
    export_imagefolder(source, tmp_path / "hf")
    original, exported = DatasetFolder(source), DatasetFolder(tmp_path / "hf")  # metadata.parquet per split
    assert [exported.split(i) for i in range(len(exported))] == ["train", "train", "val", "test"]
    for i in range(len(original)):
        np.testing.assert_array_equal(read_array(exported.path(i, "file_name")),
                                      read_array(original.path(i, "file_name")))
        assert exported.value(i, "text") == original.value(i, "text")
    assert exported.value(3, "mask_file_name") == ""  # the empty mask cell of the test row stays empty


def test_export_converts_nifti_slices_and_dicom_to_png_with_their_pixels(tmp_path, load_imagefolder):
    from pydicom.data import get_testdata_file

    source = tmp_path / "source"
    source.mkdir()
    volume = np.random.default_rng(0).normal(size=(16, 12, 3)).astype(np.float32)
    labels = (volume > 0.5).astype(np.int16)
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, flipped), source / "ct.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, flipped), source / "ct_mask.nii.gz")
    dicom = get_testdata_file("CT_small.dcm")
    if dicom is None:
        pytest.skip("DICOM test file CT_small.dcm not installed (pip install pydicom-data)")
    (source / "scan.dcm").write_bytes(open(dicom, "rb").read())
    rows = [{"file_name": "ct.nii.gz", "mask_file_name": "ct_mask.nii.gz", "slice_index": 1, "split": "train"},
            {"file_name": "ct.nii.gz", "mask_file_name": "ct_mask.nii.gz", "slice_index": 2, "split": "train"},
            {"file_name": "scan.dcm", "mask_file_name": "", "slice_index": "", "split": "test"}]
    pd.DataFrame(rows).to_csv(source / "metadata.csv", index=False)
    export_imagefolder(source, tmp_path / "hf")
    assert sorted(path.name for path in (tmp_path / "hf" / "train").iterdir()) == [
        "ct_mask_slice1.png", "ct_mask_slice2.png", "ct_slice1.png", "ct_slice2.png", "metadata.parquet"]
    loaded = load_imagefolder(tmp_path / "hf")
    # medaug's RAS slice, stretched over 16 bits
    np.testing.assert_allclose(np.array(loaded["train"][1]["image"]),
                               stretched_to_16_bits(read_array(source / "ct.nii.gz", slice_index=2)), atol=0.51)
    np.testing.assert_array_equal(np.array(loaded["train"][1]["mask"]),
                                  read_array(source / "ct_mask.nii.gz", slice_index=2))  # labels kept, 8-bit
    # CT numbers after the modality LUT are negative: stretched too
    np.testing.assert_allclose(np.array(loaded["test"][0]["image"]),
                               stretched_to_16_bits(read_array(source / "scan.dcm")), atol=0.51)


def stretched_to_16_bits(array):
    array = array.astype(np.float64)
    return (array - array.min()) / (array.max() - array.min()) * 65535


def write_hf_layout(root):
    """A medaug folder in HF's layout: split subfolders whose metadata names files from there (names repeat)."""
    for split, count in (("train", 2), ("validation", 1), ("test", 1)):
        rows = []
        for i in range(count):
            save_png(root / split / f"{i}.png", pixels(10 * len(split) + i))
            save_png(root / split / "masks" / f"{i}.png", mask_pixels(i))
            rows.append({"file_name": f"{i}.png", "mask_file_name": f"masks/{i}.png", "text": f"{split} {i}"})
        pd.DataFrame(rows).to_json(root / split / "metadata.jsonl", orient="records", lines=True)
    return root


def test_hf_layout_loads_the_same_in_hf_and_medaug(tmp_path, load_imagefolder):
    root = write_hf_layout(tmp_path / "layout")
    loaded = load_imagefolder(root)
    folder = DatasetFolder(root)
    assert folder.check().problems == []
    for hf_split, split in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = folder.indices(split)
        assert [folder.value(i, "text") for i in rows] == loaded[hf_split]["text"]
        for index, row in zip(rows, loaded[hf_split]):
            np.testing.assert_array_equal(read_array(folder.path(index, "file_name")), np.array(row["image"]))
            np.testing.assert_array_equal(read_array(folder.path(index, "mask_file_name")), np.array(row["mask"]))
    exported = export_imagefolder(root, tmp_path / "hf")  # and it exports to the same layout
    assert exported == {"train": 2, "validation": 1, "test": 1}
    assert load_imagefolder(tmp_path / "hf")["validation"]["text"] == ["validation 0"]


def test_export_command_refuses_an_existing_export_and_bad_input_by_name(tmp_path):
    source = flat_dataset(tmp_path / "source")
    output = tmp_path / "hf"
    result = runner.invoke(app, ["export", str(source), "--format", "imagefolder", "--output_dir", str(output)])
    assert result.exit_code == 0, result.output
    assert "train: 2, validation: 1, test: 1" in result.output
    assert sorted(path.name for path in output.iterdir()) == ["test", "train", "validation"]  # no lock left
    again = runner.invoke(app, ["export", str(source), "--output_dir", str(output)])
    assert again.exit_code == 2 and "--output_dir" in again.output and "pass --overwrite" in again.output
    assert runner.invoke(app, ["export", str(source), "--output_dir", str(output), "--overwrite"]).exit_code == 0
    bad_format = runner.invoke(app, ["export", str(source), "--output_dir", str(output), "--format", "coco"])
    assert bad_format.exit_code == 2 and "--format: unknown format 'coco'" in bad_format.output
    (source / "images" / "2.png").unlink()
    missing = runner.invoke(app, ["export", str(source), "--output_dir", str(tmp_path / "other")])
    assert missing.exit_code == 2 and "row 3, column 'file_name', images/2.png: file not found" in missing.output
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_export_keeps_embedding_files_as_paths(tmp_path, load_imagefolder):
    source = flat_dataset(tmp_path / "source")
    table = pd.read_csv(source / "metadata.csv", dtype=str, keep_default_na=False)
    for i in range(len(table)):
        np.save(source / f"e{i}.npy", np.full(4, i, dtype=np.float32))
    table["embedding_file_name"] = [f"e{i}.npy" for i in range(len(table))]
    table.to_csv(source / "metadata.csv", index=False)
    export_imagefolder(source, tmp_path / "hf")
    row = load_imagefolder(tmp_path / "hf")["test"][0]
    assert row["embedding_path"] == "e3.npy"  # HF would try to decode an `*_file_name` column as an image
    assert np.load(tmp_path / "hf" / "test" / row["embedding_path"]).tolist() == [3.0] * 4
    assert json.loads(json.dumps(row["text"])) == "scan 3"
