"""Dataset folders: reading the table, every bad input named by row, column and file, and the torch Dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medaug.data import DatasetError, DatasetFolder, MedicalImageDataset, fit_square


def save_png(path, height=20, width=30, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)


def save_mask(path, height=20, width=30, box=(5, 10, 8, 20)):
    mask = np.zeros((height, width), dtype=np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 255
    save_png(path, height, width, 0)
    Image.fromarray(mask).save(path)


def good_rows(root, count=4):
    rows = []
    for i in range(count):
        save_png(root / "images" / f"{i}.png")
        save_mask(root / "masks" / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "mask_file_name": f"masks/{i}.png", "label": "a" if i % 2 else "b",
                     "text": f"scan {i}", "split": ["train", "train", "val", "test"][i % 4]})
    return rows


def problems_of(root, split=None):
    return [str(problem) for problem in DatasetFolder(root).scan(split).problems]


def test_clean_folder_has_no_problems_and_reads_jsonl(tmp_path, write_dataset):
    root = write_dataset(good_rows(tmp_path), name="metadata.jsonl")
    folder = DatasetFolder(root)
    assert len(folder) == 4 and folder.metadata_path.name == "metadata.jsonl"
    scan = folder.check()
    assert scan.problems == [] and len(scan.stats) == 4
    assert scan.stats[0].mask_coverage == pytest.approx(5 * 12 / 600)
    assert folder.indices("train") == [0, 1]


def test_missing_file_is_named(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    rows[1]["file_name"] = "images/absent.png"
    problems = problems_of(write_dataset(rows))
    assert problems == ["row 2, column 'file_name', images/absent.png: file not found"]


def test_truncated_image_is_named(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    path = tmp_path / "images" / "2.png"
    path.write_bytes(path.read_bytes()[:40])
    (problem,) = problems_of(write_dataset(rows))
    assert problem.startswith("row 3, column 'file_name', images/2.png: cannot read image")


def test_mask_of_another_size_is_named(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    save_mask(tmp_path / "masks" / "0.png", height=21, width=30)
    (problem,) = problems_of(write_dataset(rows))
    assert problem == ("row 1, column 'mask_file_name', masks/0.png: size 30x21 differs from its image's 30x20 "
                       "(width x height)")


@pytest.mark.parametrize("bad_path", ["../outside.png", "images/../../outside.png", "/etc/passwd"])
def test_path_leaving_the_folder_is_refused(tmp_path, bad_path):
    root = tmp_path / "dataset"
    root.mkdir()
    save_png(tmp_path / "outside.png")  # exists, so only containment can catch it
    rows = good_rows(root)
    rows[3]["mask_file_name"] = bad_path
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    (problem,) = problems_of(root)
    assert problem.startswith(f"row 4, column 'mask_file_name', {bad_path}: ")
    assert "leaves the dataset folder" in problem or "absolute path" in problem
    with pytest.raises(DatasetError, match="mask_file_name"):
        DatasetFolder(root).path(3, "mask_file_name")


def test_unknown_split_is_named(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    rows[0]["split"] = "training"
    problems = problems_of(write_dataset(rows))
    assert problems == [
        "row 1, column 'split', images/0.png: unknown split 'training'; expected one of train, val, test"]
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        DatasetFolder(tmp_path).indices("holdout")


def test_missing_required_column_is_named(tmp_path, write_dataset):
    rows = [{"image": row["file_name"], "split": row["split"]} for row in good_rows(tmp_path)]
    with pytest.raises(DatasetError, match=r"column 'file_name': required column is missing \(columns: image, split\)"):
        DatasetFolder(write_dataset(rows))


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,split\n")
    with pytest.raises(DatasetError, match="(?s)metadata.csv: 1 problem.*the dataset is empty"):
        DatasetFolder(tmp_path)


def test_empty_split_is_refused(tmp_path, write_dataset):
    rows = [row for row in good_rows(tmp_path) if row["split"] != "test"]
    with pytest.raises(DatasetError, match="split 'test' has no rows"):
        MedicalImageDataset(write_dataset(rows), split="test")


def test_missing_metadata_and_both_metadata_files(tmp_path, write_dataset):
    with pytest.raises(DatasetError, match="no metadata.csv, metadata.jsonl or metadata.parquet"):
        DatasetFolder(tmp_path)
    write_dataset(good_rows(tmp_path))
    write_dataset(good_rows(tmp_path), name="metadata.jsonl")
    with pytest.raises(DatasetError, match="keep one"):
        DatasetFolder(tmp_path)


def test_file_listed_in_two_splits_is_a_problem(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    rows.append(dict(rows[0], split="test"))
    (problem,) = problems_of(write_dataset(rows))
    assert problem == "column 'file_name', images/0.png: listed 2 times: row 1 (train), row 5 (test)"


def test_dataset_refuses_bad_folder_before_any_sample(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    rows[0]["file_name"] = "images/absent.png"
    save_mask(tmp_path / "masks" / "1.png", height=5, width=5)
    with pytest.raises(DatasetError) as caught:
        MedicalImageDataset(write_dataset(rows), split="train")
    message = str(caught.value)
    assert "images/absent.png: file not found" in message and "masks/1.png: size 5x5" in message


def test_dataset_samples(tmp_path, write_dataset):
    rows = good_rows(tmp_path)
    dataset = MedicalImageDataset(write_dataset(rows), split="train", resolution=32, with_masks=True)
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].dtype == torch.float32
    assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1
    assert sample["mask"].shape == (1, 32, 32) and set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    assert sample["text"] == "scan 1" and sample["label"] == "a" and sample["file_name"] == "images/1.png"
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    grey = MedicalImageDataset(tmp_path, split="val", resolution=16, channels=1, value_range=(0.0, 1.0))
    assert grey[0]["pixel_values"].shape == (1, 16, 16)
    assert grey[0]["pixel_values"][0, 8, 8].item() == pytest.approx(128 / 255, abs=1e-3)


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_fit_square_keeps_image_and_mask_aligned(fit):
    image = np.zeros((40, 80, 1), dtype=np.float32)
    mask = np.zeros((40, 80), dtype=bool)
    image[10:20, 30:50] = 1.0
    mask[10:20, 30:50] = True
    fitted_image = fit_square(image, 32, fit)
    fitted_mask = fit_square(mask, 32, fit, nearest=True)
    assert fitted_image.shape == (32, 32, 1) and fitted_mask.shape == (32, 32) and fitted_mask.dtype == bool
    inside = fitted_image[..., 0][fitted_mask]
    outside = fitted_image[..., 0][~fitted_mask]
    assert inside.mean() > 0.9 and outside.mean() < 0.1


def test_manifest_round_trip_and_torn_last_line(tmp_path):
    from medaug.data import ManifestEntry, append_manifest, read_manifest

    first = ManifestEntry(file_name="images/0.png", seed=3, model_dir="/m", source_file_name="images/a.png",
                          source_split="train", prompt="scan")
    append_manifest(tmp_path, first)
    append_manifest(tmp_path, ManifestEntry(file_name="images/1.png", seed=4, model_dir="/m"))
    with open(tmp_path / "manifest.jsonl", "a") as handle:
        handle.write('{"file_name": "images/2.png", "se')  # a run killed mid-write
    entries = read_manifest(tmp_path)
    assert [entry.file_name for entry in entries] == ["images/0.png", "images/1.png"]
    assert entries[0] == first
    (tmp_path / "manifest.jsonl").write_text('{"file_name": "a.png", "seed": 1, "model_dir": "m", "colour": 1}\n')
    with pytest.raises(ValueError, match=r"line 1: unknown field\(s\) \['colour'\]"):
        read_manifest(tmp_path)
    for line, message in (('{"file_name": "a.png", "model_dir": "m"}', r"line 1: lacks field\(s\) \['seed'\]"),
                          ('{"file_name": "a.png", "seed": "1", "model_dir": "m"}', "field 'seed' should be int"),
                          ('{"file_name": "a.png", "seed": 1, "model_dir": "m", "source_split": 0}',
                           "field 'source_split' should be str"),
                          ('["a.png"]', "line 1: expected a JSON object, got list")):
        (tmp_path / "manifest.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            read_manifest(tmp_path)


def write_split_layout(root, counts=(("train", 2), ("validation", 1), ("test", 1)), name="metadata.csv"):
    """Hugging Face's split layout: each subfolder holds its files and a metadata file naming them from there.
    Every split reuses the names 0.png, 1.png, ...; a medaug folder in this layout keeps them apart."""
    for folder, count in counts:
        rows = []
        for i in range(count):
            save_png(root / folder / f"{i}.png", value=10 * i + len(folder))
            save_mask(root / folder / "masks" / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "mask_file_name": f"masks/{i}.png", "text": f"{folder} {i}"})
        table = pd.DataFrame(rows)
        if name.endswith(".csv"):
            table.to_csv(root / folder / name, index=False)
        else:
            table.to_json(root / folder / name, orient="records", lines=True)
    return root


def rewrite_rows(path, change):
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(table)
    table.to_csv(path, index=False)


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_split_layout_rows_carry_their_folder_split_and_resolve_inside_it(tmp_path, name):
    folder = DatasetFolder(write_split_layout(tmp_path, name=name))
    assert len(folder) == 4 and folder.check().problems == []
    assert [folder.split(i) for i in range(4)] == ["train", "train", "val", "test"]
    assert folder.indices("val") == [2] and folder.value(2, "text") == "validation 0"
    assert folder.path(2, "file_name") == (tmp_path / "validation" / "0.png").resolve()
    assert folder.path(3, "mask_file_name") == (tmp_path / "test" / "masks" / "0.png").resolve()
    assert folder.value(3, "file_name") == "test/0.png"  # not the same row as train/0.png
    assert MedicalImageDataset(tmp_path, split="val", resolution=16, channels=1, value_range=(0.0, 255.0))[0][
        "pixel_values"][0, 8, 8].item() == pytest.approx(len("validation"), abs=0.5)


def test_split_layout_accepts_val_and_refuses_both_val_folders(tmp_path):
    write_split_layout(tmp_path, counts=(("train", 1), ("val", 1)))
    assert [DatasetFolder(tmp_path).split(i) for i in range(2)] == ["train", "val"]
    write_split_layout(tmp_path, counts=(("validation", 1),))
    with pytest.raises(DatasetError, match="both validation/ and val/ hold metadata"):
        DatasetFolder(tmp_path)


def test_split_layout_problems_name_the_subfolder_metadata_file(tmp_path):
    write_split_layout(tmp_path, counts=(("train", 2), ("validation", 2)))
    (tmp_path / "validation" / "1.png").unlink()
    rewrite_rows(tmp_path / "train" / "metadata.csv", lambda table: table.__setitem__("file_name", ["0.png", "0.png"]))
    problems = [str(problem) for problem in DatasetFolder(tmp_path).scan().problems]
    assert problems == [
        "column 'file_name', train/0.png: listed 2 times: train/metadata.csv row 1 (train), "
        "train/metadata.csv row 2 (train)",
        "validation/metadata.csv row 2, column 'file_name', validation/1.png: file not found",
    ]


@pytest.mark.parametrize("bad_path, reason", [("../train/0.png", "leaves its split folder test/"),
                                              ("../../outside.png", "leaves its split folder test/"),
                                              ("/etc/hostname", "absolute path")])
def test_split_layout_paths_may_not_leave_their_subfolder(tmp_path, bad_path, reason):
    root = write_split_layout(tmp_path / "dataset")
    save_png(tmp_path / "outside.png")
    rewrite_rows(root / "test" / "metadata.csv", lambda table: table.__setitem__("mask_file_name", [bad_path]))
    (problem,) = [str(problem) for problem in DatasetFolder(root).scan().problems]
    assert problem.startswith("test/metadata.csv row 1, column 'mask_file_name', ") and reason in problem
    with pytest.raises(DatasetError, match="mask_file_name"):
        DatasetFolder(root).path(3, "mask_file_name")


def test_split_layout_refuses_a_top_level_table_beside_it(tmp_path, write_dataset):
    write_split_layout(tmp_path)
    write_dataset([{"file_name": "train/0.png"}])
    with pytest.raises(DatasetError, match=r"both a top-level metadata.csv and split subfolders .*train/, "
                                           r"validation/, test/.*keep one layout"):
        DatasetFolder(tmp_path)


def test_split_layout_refuses_a_split_column_that_contradicts_the_folder(tmp_path):
    write_split_layout(tmp_path)
    rewrite_rows(tmp_path / "validation" / "metadata.csv", lambda table: table.__setitem__("split", ["validation"]))
    assert DatasetFolder(tmp_path).split(2) == "val"  # HF's name for the same split agrees
    rewrite_rows(tmp_path / "test" / "metadata.csv", lambda table: table.__setitem__("split", ["train"]))
    with pytest.raises(DatasetError, match=r"(?s)test/metadata.csv: 1 problem.*test/metadata.csv row 1, column "
                                           r"'split', 0.png: split 'train' contradicts its folder test/"):
        DatasetFolder(tmp_path)


def test_split_layout_refuses_a_split_folder_without_metadata_or_file_name(tmp_path):
    write_split_layout(tmp_path, counts=(("train", 1), ("test", 1)))
    def rename_file_name(table):
        table.columns = ["image" if column == "file_name" else column for column in table.columns]

    rewrite_rows(tmp_path / "test" / "metadata.csv", rename_file_name)
    with pytest.raises(DatasetError, match=r"(?s)test/metadata.csv: 1 problem.*column 'file_name': required column"):
        DatasetFolder(tmp_path)
    (tmp_path / "test" / "metadata.csv").unlink()
    with pytest.raises(DatasetError, match="split folder test/ has no metadata.csv, metadata.jsonl or metadata.parquet, unlike train/"):
        DatasetFolder(tmp_path)
