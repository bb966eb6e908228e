"""Metadata that means one thing: `medaug inspect` and the commands that train give the same verdict on duplicate
columns, labels that spell a missing value, masks with more than two values and a split of empty masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import DatasetError, DatasetFolder
from medaug.segmentation.inputs import StudyError, load_study_data

runner = CliRunner()


def image_folder(root, mask_values=(0, 1), empty_train=False, label=lambda k: ("benign", "malignant")[k % 2]):
    """8 train and 2 test rows of 16x16 images with masks whose lesion holds `mask_values`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k in range(10):
        split = "train" if k < 8 else "test"
        pixels = np.random.default_rng(k).integers(0, 255, (16, 16), dtype=np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        if not (empty_train and split == "train"):
            for level, value in enumerate(mask_values[1:]):
                mask[4 + 2 * level:6 + 2 * level, 4:12] = value
        Image.fromarray(pixels).save(root / "images" / f"{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
        rows.append(f"images/{k}.png,masks/{k}.png,{label(k)},{split}")
    (root / "metadata.csv").write_text("file_name,mask_file_name,label,split\n" + "\n".join(rows) + "\n")
    return root


def inspect(root):
    result = runner.invoke(app, ["inspect", str(root)], env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("layout, text", [
    ("metadata.csv", "file_name,split,label,split\na.png,train,x,test\n"),
    ("metadata.jsonl", '{"file_name": "a.png", "split": "train", "split": "test"}\n'),
])
def test_a_column_given_twice_is_refused_by_name(tmp_path, layout, text):
    (tmp_path / layout).write_text(text)
    with pytest.raises(DatasetError, match="column 'split': appears 2 times"):
        DatasetFolder(tmp_path)
    code, output = inspect(tmp_path)
    assert code == 2 and "column 'split': appears 2 times" in output


def test_a_label_that_spells_a_missing_value_is_a_problem_everywhere(tmp_path):
    root = image_folder(tmp_path / "d", label=lambda k: "NaN" if k == 3 else ("benign", "malignant")[k % 2])
    code, output = inspect(root)
    assert code == 1 and "row 4, column 'label', images/3.png: 'NaN' spells a missing value" in output
    with pytest.raises(StudyError, match="'NaN' spells a missing value"):
        load_study_data("cls", root)
    table = (root / "metadata.csv").read_text().replace("label", "finding")  # any --label_column
    (root / "metadata.csv").write_text(table)
    with pytest.raises(StudyError, match=r"rows 4 of split 'train' spell a missing value in column 'finding'"):
        load_study_data("cls", root, label_column="finding")


def test_masks_with_more_than_two_values_are_read_as_one_foreground_and_said_so(tmp_path):
    root = image_folder(tmp_path / "d", mask_values=(0, 1, 2, 3))
    code, output = inspect(root)
    expected = ("10 mask(s) hold more than two values (as many as 4; first masks/0.png); medaug reads every value "
                "above 0")
    assert code == 0 and expected in output
    assert any(expected in note for note in load_study_data("seg", root).notes)


def test_a_split_of_empty_masks_is_refused_for_segmentation_and_shown_by_inspect(tmp_path):
    root = image_folder(tmp_path / "d", empty_train=True)
    code, output = inspect(root)
    assert code == 0 and "split 'train': all 8 mask(s) are empty" in output
    with pytest.raises(StudyError, match="split 'train': all 6 mask"):  # one row of each label became val (the carve)
        load_study_data("seg", root)
