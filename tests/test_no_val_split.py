"""Datasets with train and test rows only: one carve of a val split (medaug.data.validation), the same for every
command that needs one, said once in the log, stated in each report, test rows and the user's folder untouched;
commands that need none say nothing."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medaug.cli import app
from medaug.console import describe
from medaug.data import DatasetError, DatasetFolder
from medaug.data.subset import write_rows
from medaug.data.validation import ensure_validation
from medaug.demo import run_demo
from medaug.scripts import train_pix2pix
from tests.test_demo import TINY as TINY_DEMO

runner = CliRunner()


def patients(counts: dict[str, int], per_patient: int = 2, tests: int = 2) -> list[dict]:
    rows = [{"file_name": f"{label}_{p}_{k}.png", "label": label, "split": "train", "patient_id": f"{label}{p}"}
            for label, number in counts.items() for p in range(number) for k in range(per_patient)]
    return rows + [{"file_name": f"t{k}.png", "label": "benign", "split": "test", "patient_id": f"T{k}"}
                   for k in range(tests)]


def test_the_carve_is_stratified_seeded_by_whole_patients_and_leaves_test_alone(write_dataset):
    folder = DatasetFolder(write_dataset(patients({"benign": 24, "malignant": 8, "rare": 1})))
    carve = ensure_validation(folder, log=False)
    val = folder.indices("val")
    labels = [folder.value(i, "label") for i in val]
    # an eighth of each label's patients (24 -> 3, 8 -> 1), two rows each; the single rare patient stays in train
    assert (labels.count("benign"), labels.count("malignant"), labels.count("rare")) == (6, 2, 0)
    assert carve.carved and carve.carved_from == 66 and len(carve.files) == 8
    val_patients = {folder.value(i, "patient_id") for i in val}
    train_patients = {folder.value(i, "patient_id") for i in folder.indices("train")}
    assert not val_patients & train_patients  # no patient on both sides
    assert [folder.split(i) for i in range(len(folder)) if folder.value(i, "file_name").startswith("t")] == \
        ["test", "test"]
    again = DatasetFolder(folder.root)
    assert ensure_validation(again, log=False) == carve  # the same rows every time: one carve for every stage
    assert pd.read_csv(folder.root / "metadata.csv")["split"].tolist().count("val") == 0  # nothing written


def test_a_folder_with_its_own_val_split_keeps_it(write_dataset):
    rows = patients({"benign": 8}) + [{"file_name": "v.png", "label": "benign", "split": "val", "patient_id": "V"}]
    folder = DatasetFolder(write_dataset(rows))
    validation = ensure_validation(folder)
    assert not validation.carved and validation.files == ("v.png",)
    assert validation.describe() == "validation: the dataset's val split (1 rows)"


def test_too_few_train_patients_to_carve_is_refused_naming_the_folder(write_dataset):
    root = write_dataset(patients({"benign": 1, "malignant": 1}))
    with pytest.raises(DatasetError, match="no val split, and its 4 train row"):
        ensure_validation(DatasetFolder(root))


def test_an_error_from_numerical_code_names_the_command_s_inputs(tmp_path):
    try:
        np.stack([])
    except ValueError as error:
        message = describe(error, ["ssl", "--data", str(tmp_path), "--output_dir", str(tmp_path / "new")])
    assert message.startswith("need at least one array to stack (raised inside numpy while working on "
                              f"--data {tmp_path};")
    try:
        DatasetFolder(tmp_path / "missing")
    except DatasetError as error:  # medaug's own messages name the input already and stay as they are
        assert describe(error, ["--data", str(tmp_path)]) == str(error)


# ---- every command that reads a dataset, on one folder without val rows -------------------------------------


@pytest.fixture(scope="module")
def no_val(phantom_dir, tmp_path_factory):
    """The phantom with its val rows moved to train: train and test rows only, as many public sets ship."""
    root = tmp_path_factory.mktemp("noval") / "data"
    folder = DatasetFolder(phantom_dir)
    folder.assign_split(folder.indices("val"), "train")
    write_rows(folder, root, list(range(len(folder))))
    return root


def checksums(root) -> dict:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def carved_files(output) -> list[str] | None:
    """The val rows a command's own record names, for the commands that write one."""
    for name, keys in (("results.json", ("validation",)), ("summary.json", ("validation",)),
                       ("stages/data.json", ("result", "validation"))):
        if (output / name).is_file():
            record = json.loads((output / name).read_text())
            for key in keys:
                record = record[key]
            return record["files"]
    return None


def stated_origin(output) -> str:
    """Every page and record a command wrote, as one text (the reports state where validation came from)."""
    return " ".join(" ".join(path.read_text(errors="ignore").split()) for path in output.rglob("*")
                    if path.suffix in (".md", ".html", ".json") and path.is_file())


COMMANDS = {  # name: (needs a val split, arguments after the data folder D and output folder O)
    "bench seg": (True, ["bench", "seg", "--data", "D", "--output_dir", "O", "--steps", "2", "--seeds", "2",
                         "--resolution", "32", "--num_threads", "1"]),
    "bench cls": (True, ["bench", "cls", "--data", "D", "--output_dir", "O", "--steps", "2", "--seeds", "2",
                         "--resolution", "32", "--num_threads", "1", "--gradcam_images", "0"]),
    "study seg": (True, ["study", "seg", "--data", "D", "--output_dir", "O", "--quick", "--generators", "pix2pix",
                         "--arms", "real,real+synthetic", "--real_fractions", "0.5"]),
    "ssl": (True, ["ssl", "--data", "D", "--output_dir", "O", "--method", "simclr", "--policies", "crop",
                   "--seeds", "0", "--resolution", "32", "--steps", "1", "--supervised_steps", "1", "--batch_size",
                   "4", "--gradcam_images", "0"]),
    "evaluate": (True, ["evaluate", "--real", "D", "--synthetic", "S", "--output_dir", "O", "--model_path", "M",
                        "--kid_subsets", "10", "--diversity_pairs", "4", "--nearest_k", "2", "--fidelity_epochs",
                        "1", "--fidelity_resolution", "32"]),
    "demo": (True, None),  # the command's flags cannot make it tiny: run_demo with the test's settings
    "inspect": (False, ["inspect", "D"]),
    "edges": (False, ["edges", "D", "--output_dir", "O", "--method", "mask_boundary"]),
    "export": (False, ["export", "D", "--output_dir", "O"]),
    "train-encoder": (False, ["train-encoder", "D", "--output_dir", "O", "--max_train_steps", "1",
                              "--train_batch_size", "4", "--resolution", "32"]),
    "embed": (False, ["embed", "D", "--model_path", "E", "--output", "V"]),
    "train_pix2pix.py": (False, None),  # the training scripts, through their main() as accelerate runs them
    "generate": (False, ["generate", "--base_model", "M", "--controlnet", "C", "--from_masks", "D", "--output_dir",
                         "O", "--num_inference_steps", "1", "--max_sources", "2"]),
}


def tiny_pix2pix(data, output):
    train_pix2pix.main(train_pix2pix.parse_args([
        "--train_data_dir", str(data), "--output_dir", str(output), "--max_train_steps", "1", "--train_batch_size",
        "4", "--resolution", "32", "--generator_channels", "8,16"]))


SCRIPTS = {"demo": lambda data, output: run_demo(output, data, TINY_DEMO), "train_pix2pix.py": tiny_pix2pix}


@pytest.fixture(scope="module")
def synthetic_pairs(no_val, tmp_path_factory):
    """Training pairs written as a synthetic folder, for evaluate's label fidelity."""
    folder = DatasetFolder(no_val)
    return write_rows(folder, tmp_path_factory.mktemp("pairs") / "synthetic", folder.indices("train")[:6])


@pytest.fixture(scope="module")
def controlnet(tiny_model_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from tests.model_folders import random_controlnet

    path = tmp_path_factory.mktemp("controlnet") / "controlnet"
    random_controlnet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")).save_pretrained(
        path, safe_serialization=True)
    return path


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_on_a_folder_without_val_rows(command, no_val, synthetic_pairs, tiny_model_dir, controlnet,
                                                    tmp_path, caplog, monkeypatch, one_torch_thread):
    monkeypatch.setattr("medaug.training.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    needs_val, arguments = COMMANDS[command]
    output = tmp_path / "out"
    places = {"D": no_val, "O": output, "S": synthetic_pairs, "M": tiny_model_dir, "C": controlnet,
              "E": tiny_model_dir / "image_encoder", "V": tmp_path / "v.safetensors"}
    before = checksums(no_val)
    expected = ensure_validation(DatasetFolder(no_val), log=False)
    with caplog.at_level(logging.WARNING, logger="medaug.data.validation"):
        if arguments is None:
            SCRIPTS[command](no_val, output)
        else:
            result = runner.invoke(app, [str(places.get(argument, argument)) for argument in arguments])
            assert result.exit_code == 0, (result.output, result.exception)
    said = [record.getMessage() for record in caplog.records if record.name == "medaug.data.validation"]
    assert checksums(no_val) == before  # the user's folder, test rows included, is untouched
    if not needs_val:
        assert said == []
        return
    assert said == [f"{no_val}: {expected.describe()}"]  # the same line, once
    assert expected.origin() in stated_origin(output)  # the report says where validation came from
    files = carved_files(output)
    assert files is None or files == list(expected.files)  # the same carve
    if command == "study seg":  # every subset carries that carve as its val split; no generator trains on it
        subset = DatasetFolder(output / "subsets" / "d0" / "f0.5")
        assert [subset.value(i, "file_name") for i in subset.indices("val")] == list(expected.files)
        assert len(subset.indices("test")) == len(DatasetFolder(no_val).indices("test"))
    if command == "demo":  # every stage reads the demo's copy, whose metadata holds the carve
        copy = DatasetFolder(output / "data")
        assert [copy.value(i, "file_name") for i in copy.indices("val")] == list(expected.files)
