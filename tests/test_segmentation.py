"""medaug.segmentation pieces: metrics on hand-made masks, statistics, transforms, networks, bad input."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medaug.data import ManifestEntry, append_manifest
from medaug.data.manifest import file_sha256
from medaug.segmentation.inputs import StudyError, load_study_data
from medaug.segmentation.metrics import classification_scores, segmentation_scores
from medaug.segmentation.networks import (CLASSIFICATION_NETWORKS, SEGMENTATION_NETWORKS, build_network,
                                          check_resolution)
from medaug.segmentation.stats import mean_ci, paired_test
from medaug.segmentation.transforms import RandChessboardCutout, RandClahe, build_transforms
from tests.conftest import shared_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def masks(*boxes_per_image, size=16):
    """(B, 1, size, size) masks with the given (top, bottom, left, right) boxes set to 1."""
    out = torch.zeros(len(boxes_per_image), 1, size, size)
    for index, boxes in enumerate(boxes_per_image):
        for top, bottom, left, right in boxes:
            out[index, 0, top:bottom, left:right] = 1
    return out


def test_a_perfect_prediction_scores_one_one_zero():
    truth = masks([(2, 9, 3, 11)], [(5, 6, 5, 6), (10, 14, 1, 4)])
    scores = segmentation_scores(truth.clone(), truth)
    assert scores["dice"] == [1.0, 1.0] and scores["iou"] == [1.0, 1.0] and scores["hd95"] == [0.0, 0.0]


def test_hand_made_masks_give_hand_computed_scores():
    # 4x4 squares overlapping in a 4x2 band: Dice 2*8/32, IoU 8/24. Two single pixels 3 apart: HD95 3.
    prediction = masks([(2, 6, 2, 6)], [(5, 6, 5, 6)], [], [(3, 4, 3, 4)])
    truth = masks([(2, 6, 4, 8)], [(5, 6, 8, 9)], [], [])
    scores = segmentation_scores(prediction, truth)
    assert scores["dice"][0] == pytest.approx(0.5) and scores["iou"][0] == pytest.approx(1 / 3)
    assert scores["hd95"][1] == pytest.approx(3.0) and scores["dice"][1] == 0.0
    # both empty: a correct "no lesion" is Dice/IoU 1 and has no distance
    assert scores["dice"][2] == 1.0 and scores["iou"][2] == 1.0 and math.isnan(scores["hd95"][2])
    # a lesion where there is none: Dice 0 and the worst distance, the image diagonal
    assert scores["dice"][3] == 0.0 and scores["hd95"][3] == pytest.approx(math.hypot(16, 16))


def test_segmentation_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="expected two"):
        segmentation_scores(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


def test_classification_scores_on_a_hand_made_case():
    probabilities = torch.tensor([[.8, .1, .1], [.2, .7, .1], [.1, .2, .7], [.5, .4, .1], [.3, .3, .4]])
    labels = torch.tensor([0, 1, 2, 1, 2])
    scores = classification_scores(probabilities, labels)
    # predictions 0,1,2,0,2: F1 per class 2/3, 2/3, 1; every positive outranks every negative
    assert scores["accuracy"] == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx(7 / 9, abs=1e-6)
    assert scores["auc"] == pytest.approx(1.0)


def test_mean_ci_uses_student_t_and_paired_test_sees_a_shift():
    mean, half_width = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([0.7])[1]) and mean_ci([0.7, None])[0] == 0.7
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.8, 30)
    better = paired_test(list(base + 0.05 + rng.normal(0, 0.01, 30)), list(base))
    assert better["p_value"] < 0.001 and better["mean_difference"] == pytest.approx(0.05, abs=0.01)
    same = paired_test(list(base), list(base))
    assert same["mean_difference"] == 0.0 and math.isnan(same["p_value"])
    assert paired_test([1.0, float("nan"), 0.5], [0.5, 0.2, 0.5])["n_pairs"] == 2


def _offset_square_item(tmp_path, height=40, width=64):
    """A non-square image whose bright square (off-centre) is exactly its mask."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[6:20, 40:58] = 255  # even bounds: exact at half size, where area and nearest resizing agree
    image = np.where(mask > 0, 230, 40).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return {"image": str(tmp_path / "image.png"), "mask": str(tmp_path / "mask.png"), "slice_index": -1,
            "label": 0, "file_name": "image.png"}


def test_loading_keeps_image_and_mask_aligned_through_padding(tmp_path):
    item = _offset_square_item(tmp_path)
    sample = build_transforms(32, 1, "pad", with_masks=True, augment="none")(item)
    image, mask = sample["image"], sample["mask"]
    assert image.shape == (1, 32, 32) and mask.shape == (1, 32, 32)
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    assert torch.equal(image > 0.5, mask > 0.5)
    assert not mask[:, :6].any()  # 64x40 padded to 32x32: rows 0..5 are padding


def test_classical_augmentation_moves_the_mask_with_the_image(tmp_path):
    item = _offset_square_item(tmp_path)
    transform = build_transforms(32, 1, "pad", with_masks=True, augment="classical")
    transform.set_random_state(seed=0)
    overlaps, changed = [], 0
    plain = build_transforms(32, 1, "pad", with_masks=True, augment="none")(item)
    for _ in range(12):
        sample = transform(item)
        bright, mask = sample["image"] > 0.5, sample["mask"] > 0.5
        overlaps.append(float((bright & mask).sum() / (bright | mask).sum()))
        changed += int(not torch.equal(sample["mask"], plain["mask"]))
    assert changed > 0  # flips and rotations did happen to the mask
    assert np.median(overlaps) > 0.6  # and the bright square went with it (a flip of one alone gives 0)


def test_chessboard_cutout_and_clahe():
    image = np.full((1, 40, 40), 0.6, dtype=np.float32)
    cutout = RandChessboardCutout(prob=1.0, fraction=1.0)
    cutout.set_random_state(0)
    erased = cutout(image)
    zero = erased == 0
    assert 0.2 < zero.mean() < 0.8 and np.all(erased[~zero] == np.float32(0.6))
    ramp = np.tile(np.linspace(0.4, 0.6, 40, dtype=np.float32), (1, 40, 1))
    clahe = RandClahe(prob=1.0)
    clahe.set_random_state(0)
    equalised = clahe(torch.from_numpy(ramp))
    assert isinstance(equalised, torch.Tensor) and 0.0 <= equalised.min() and equalised.max() <= 1.0
    assert float(equalised.std()) > float(ramp.std())  # contrast was stretched


@pytest.mark.parametrize("name", sorted(SEGMENTATION_NETWORKS))
def test_each_segmentation_network_maps_an_image_to_two_channel_logits(name):
    torch.manual_seed(0)
    model = build_network("seg", name, 1, 2)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2, 32, 32)


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_NETWORKS))
def test_each_classification_network_gives_class_logits(name):
    model = build_network("cls", name, 1, 3).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_network_errors_name_the_flag():
    with pytest.raises(ValueError, match="--network: unknown seg network 'vnet'"):
        build_network("seg", "vnet", 1, 2)
    with pytest.raises(ValueError, match="--resolution: network 'smp_unet' needs a multiple of 32"):
        check_resolution("seg", "smp_unet", 48)


# --- bad input: each refused before training, naming what is wrong -----------------------------------------


def _synthetic_copy(source, target, rows=4, mask=True, label=None):
    """A synthetic folder: the first `rows` training rows of `source`, with a manifest from train sources."""
    table = pd.read_csv(source / "metadata.csv")
    table = table[table.split == "train"].head(rows).copy()
    shutil.copytree(source / "images", target / "images")
    shutil.copytree(source / "masks", target / "masks")
    table["split"] = "train"
    if not mask:
        table["mask_file_name"] = ""
    if label is not None:
        table["label"] = label
    table.to_csv(target / "metadata.csv", index=False)
    for name, mask_name in zip(table.file_name, table.mask_file_name.fillna("")):
        append_manifest(target, ManifestEntry(
            file_name=name, seed=0, model_dir="model", source_dataset=str(source), source_file_name=name,
            source_split="train", sha256=file_sha256(target / name), mask_file_name=mask_name,
            mask_sha256=file_sha256(target / mask_name) if mask_name else ""))
    return target


def test_clean_phantom_folders_load(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn")
    data = load_study_data("seg", phantom_dir, [synthetic])
    assert (len(data.train), len(data.val), len(data.test), len(data.synthetic)) == (14, 2, 4, 4)
    assert all(item["mask"] for item in data.train + data.synthetic) and data.notes == []
    assert load_study_data("cls", phantom_dir).classes == ["irregular", "round"]


def test_synthetic_masks_of_another_size_are_refused(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn")
    name = pd.read_csv(synthetic / "metadata.csv").mask_file_name[1]
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(synthetic / name)
    with pytest.raises(StudyError, match=rf"(?s)--synthetic .*row 2, column 'mask_file_name', {name}: size 30x20"):
        load_study_data("seg", phantom_dir, [synthetic])


def test_synthetic_images_without_masks_are_refused_for_segmentation(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn", mask=False)
    with pytest.raises(StudyError, match=r"rows 1, 2, 3, 4 have no mask \(column 'mask_file_name'\)"):
        load_study_data("seg", phantom_dir, [synthetic])
    assert len(load_study_data("cls", phantom_dir, [synthetic]).synthetic) == 4  # fine for classification


def test_synthetic_labels_the_real_set_lacks_are_refused(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn", label="spiculated")
    for task in ("cls", "seg"):
        with pytest.raises(StudyError, match=r"label\(s\) \['spiculated'\] of column 'label' are not in the real"):
            load_study_data(task, phantom_dir, [synthetic])


def test_a_synthetic_folder_generated_from_test_sources_is_refused(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn")
    test_file = pd.read_csv(phantom_dir / "metadata.csv").query("split == 'test'").file_name.iloc[0]
    append_manifest(synthetic, ManifestEntry(file_name="images/new.png", seed=3, model_dir="model",
                                             source_dataset=str(phantom_dir), source_file_name=test_file,
                                             source_split="test"))
    with pytest.raises(StudyError, match=rf"manifest.jsonl line 5 .*test-split source '{test_file}'"):
        load_study_data("seg", phantom_dir, [synthetic])


def test_rows_merged_in_without_manifest_lines_are_refused(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn", rows=2)
    merged = pd.concat([pd.read_csv(synthetic / "metadata.csv"),  # two more rows, as if copied from another folder
                        pd.read_csv(phantom_dir / "metadata.csv").query("split == 'train'").iloc[2:4].assign(
                            split="train")])
    merged.to_csv(synthetic / "metadata.csv", index=False)
    with pytest.raises(StudyError, match=r"2 of 4 row\(s\) have unknown provenance, e.g. row 3 \(.*\): no manifest"):
        load_study_data("seg", phantom_dir, [synthetic])


def test_an_image_or_mask_swapped_after_generation_is_refused(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn")
    table = pd.read_csv(synthetic / "metadata.csv")
    shutil.copy(synthetic / table.file_name[1], synthetic / table.file_name[0])
    with pytest.raises(StudyError, match=r"row 1 .*the image is not the one generated"):
        load_study_data("seg", phantom_dir, [synthetic])
    shutil.copy(phantom_dir / table.file_name[0], synthetic / table.file_name[0])
    shutil.copy(synthetic / table.mask_file_name[1], synthetic / table.mask_file_name[0])
    with pytest.raises(StudyError, match=r"row 1 .*the mask is not the one the image was generated for"):
        load_study_data("seg", phantom_dir, [synthetic])


def test_a_deleted_manifest_is_refused_unless_the_risk_is_accepted(phantom_dir, tmp_path):
    synthetic = _synthetic_copy(phantom_dir, tmp_path / "syn")
    (synthetic / "manifest.jsonl").unlink()
    with pytest.raises(StudyError, match=r"4 of 4 row\(s\) have unknown provenance.*--allow_unknown_provenance"):
        load_study_data("seg", phantom_dir, [synthetic])
    data = load_study_data("seg", phantom_dir, [synthetic], allow_unknown_provenance=True)
    assert len(data.synthetic) == 4
    assert len(data.notes) == 1 and data.notes[0].startswith("RISK (--allow_unknown_provenance)")


def _copy_dataset(source, target, edit):
    shutil.copytree(source, target)
    table = pd.read_csv(target / "metadata.csv")
    edit(table)
    table.to_csv(target / "metadata.csv", index=False)
    return target


def test_an_empty_split_is_refused(phantom_dir, tmp_path):
    real = _copy_dataset(phantom_dir, tmp_path / "real",
                         lambda t: t.__setitem__("split", t.split.replace("test", "val")))
    with pytest.raises(StudyError, match=r"split 'test' has no rows"):
        load_study_data("seg", real)


def test_a_test_image_that_is_also_a_training_image_is_refused(phantom_dir, tmp_path):
    def duplicate(table):
        test_row = table.index[table.split == "test"][0]
        train_file = table.file_name[table.split == "train"].iloc[0]
        shutil.copy(tmp_path / "real" / train_file, tmp_path / "real" / "images" / "copy.png")
        table.loc[test_row, "file_name"] = "images/copy.png"

    real = _copy_dataset(phantom_dir, tmp_path / "real", duplicate)
    with pytest.raises(StudyError, match=r"test image images/copy.png has the same bytes as real training image"):
        load_study_data("seg", real)


def test_a_patient_in_test_and_train_is_refused(phantom_dir, tmp_path):
    def same_patient(table):
        table["patient_id"] = [f"p{i}" for i in range(len(table))]
        first_train = table.patient_id[table.split == "train"].iloc[0]
        table.loc[table.index[table.split == "test"][0], "patient_id"] = first_train

    real = _copy_dataset(phantom_dir, tmp_path / "real", same_patient)
    with pytest.raises(StudyError, match=r"has the same patient_id 'p0' as real training image"):
        load_study_data("seg", real)


def test_the_real_busi_folder_loads_for_both_tasks():
    busi = shared_dataset("busi")
    data = load_study_data("seg", busi, check_images=False)
    assert (len(data.train), len(data.val), len(data.test)) == (546, 78, 156)
    assert load_study_data("cls", busi, check_images=False).classes == ["benign", "malignant", "normal"]
