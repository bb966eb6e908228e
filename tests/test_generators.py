"""train_autoencoder.py and train_gan.py: each condition mode trains, saves a run folder that `medaug generate` turns
into a synthetic folder whose provenance the benchmarks accept, resumes to the uninterrupted run, and refuses bad
flags and datasets by name."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.console import reporting_errors
from medaug.data import DatasetError, read_manifest
from medaug.generate import generate
from medaug.models.autoencoder import ConvVAE
from medaug.models.gan import CODE_DISTRIBUTIONS, draw_codes, squash_codes
from medaug.pipelines import MedaugGeneratorPipeline
from medaug.run_record import read_run_record
from medaug.scripts import train_autoencoder, train_gan
from medaug.segmentation.inputs import load_study_data, synthetic_pool
from medaug.training.loss_log import LOSS_HISTORY, read_loss_history

SMALL = ["--resolution", "32", "--generator_channels", "32,16", "--train_batch_size", "4", "--checkpointing_steps", "2"]


def train(script, data, output_dir, steps, *extra):
    arguments = ["--train_data_dir", data, "--output_dir", output_dir, "--max_train_steps", steps, *SMALL, *extra]
    return script.main(script.parse_args([str(value) for value in arguments]))


def square_mask(top: int) -> np.ndarray:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[top:top + 10, 8:20] = 1
    return mask


@pytest.fixture
def phantom_copy(phantom_dir, tmp_path):
    """A copy of the phantom dataset whose metadata a test may edit."""
    return shutil.copytree(phantom_dir, tmp_path / "data")


@pytest.fixture(scope="module")
def autoencoder_run(phantom_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("autoencoder") / "run"
    torch.set_num_threads(1)
    summary = train(train_autoencoder, phantom_dir, output_dir, 30, "--condition", "mask", "--learning_rate", "3e-3",
                    "--validation_steps", "30", "--random_flip")
    return output_dir, summary


@pytest.fixture(scope="module")
def class_gan_run(phantom_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gan") / "run"
    summary = train(train_gan, phantom_dir, output_dir, 4, "--condition", "class", "--validation_steps", "4")
    return output_dir, summary


# ---------------------------------------------------------------------------------------------------------
# Autoencoder, mask-conditioned
# ---------------------------------------------------------------------------------------------------------

def test_autoencoder_learns_and_draws_for_the_mask(autoencoder_run):
    output_dir, _ = autoencoder_run
    mse = [line["mse"] for line in read_loss_history(output_dir / LOSS_HISTORY)]
    assert len(mse) == 30 and np.mean(mse[-5:]) < 0.8 * np.mean(mse[:5])
    record = read_run_record(output_dir)
    assert (record.generator, record.generator_condition, record.channels) == ("autoencoder", "mask", 1)
    assert (output_dir / "validation" / "step-000030.png").is_file()
    assert ConvVAE.from_pretrained(output_dir / "autoencoder").config.condition == "mask"
    pipe = MedaugGeneratorPipeline.from_medaug(output_dir)
    first, second = (pipe(mask_image=square_mask(top), generator=torch.Generator().manual_seed(0),
                          output_type="np").images for top in (2, 18))
    assert np.abs(first - second).max() > 1e-3  # the decoder reads the mask
    with pytest.raises(ValueError, match="mask_image: this autoencoder draws an image for a mask"):
        pipe(num_images=1)


def test_autoencoder_generates_pairs_a_segmentation_study_accepts(autoencoder_run, phantom_dir, tmp_path):
    output_dir, _ = autoencoder_run
    summary = generate(output_dir, tmp_path / "synthetic", from_masks=phantom_dir, max_sources=3, num_per_source=2)
    assert summary["written"] == 6
    entries = read_manifest(tmp_path / "synthetic")
    assert all(entry.mask_file_name and entry.mask_sha256 and entry.source_split == "train" for entry in entries)
    assert len(load_study_data("seg", phantom_dir, [tmp_path / "synthetic"]).synthetic) == 6
    with pytest.raises(ValueError, match="--from_masks: .* draws each image for a mask"):
        generate(output_dir, tmp_path / "none")
    with pytest.raises(ValueError, match="--compile: only latent diffusion"):
        generate(output_dir, tmp_path / "compiled", from_masks=phantom_dir, compile_model=True)
    assert not (tmp_path / "compiled").exists()


# ---------------------------------------------------------------------------------------------------------
# GAN, class-conditional
# ---------------------------------------------------------------------------------------------------------

def test_class_gan_generates_labelled_images_reproducibly(class_gan_run, phantom_dir, tmp_path):
    output_dir, _ = class_gan_run
    record = read_run_record(output_dir)
    assert (record.generator, record.generator_condition, record.class_names) == ("gan", "class",
                                                                                 ["irregular", "round"])
    assert (output_dir / "validation" / "step-000004.png").is_file()
    # No source given: the run's own training rows, each image drawn for its row's label.
    for name in ("first", "again"):
        generate(output_dir, tmp_path / name, max_sources=4)
    first, again = read_manifest(tmp_path / "first"), read_manifest(tmp_path / "again")
    assert [entry.sha256 for entry in first] == [entry.sha256 for entry in again] and len(first) == 4
    table = pd.read_csv(tmp_path / "first" / "metadata.csv", dtype=str, keep_default_na=False)
    real = pd.read_csv(phantom_dir / "metadata.csv", dtype=str).set_index("file_name")
    assert list(table["label"]) == [real.at[entry.source_file_name, "label"] for entry in first]
    assert set(table.get("mask_file_name", [""])) == {""}  # a class GAN's image does not show its row's mask
    assert len(load_study_data("cls", phantom_dir, [tmp_path / "first"]).synthetic) == 4
    pipe = MedaugGeneratorPipeline.from_medaug(output_dir)
    round_, irregular = (pipe(class_labels=[label], generator=torch.Generator().manual_seed(0),
                              output_type="np").images for label in ("round", "irregular"))
    assert np.abs(round_ - irregular).max() > 1e-4


def test_class_gan_refuses_masks_and_unknown_labels(class_gan_run, phantom_copy, tmp_path):
    output_dir, _ = class_gan_run
    with pytest.raises(ValueError, match="--from_masks: .*does not draw images for masks"):
        generate(output_dir, tmp_path / "masks", from_masks=phantom_copy)
    table = pd.read_csv(phantom_copy / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[0, "label"] = "oval"
    table.to_csv(phantom_copy / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="--from_images .*row 1, column 'label': 'oval' is not a class"):
        generate(output_dir, tmp_path / "labels", from_images=phantom_copy)


def test_gan_resumes_to_the_uninterrupted_run(phantom_dir, tmp_path):
    codes = ["--condition", "class", "--code_distributions", "bernoulli,uniform", "--code_dims", "2"]
    whole = train(train_gan, phantom_dir, tmp_path / "whole", 4, *codes)
    first = train(train_gan, phantom_dir, tmp_path / "split", 2, *codes)
    second = train(train_gan, phantom_dir, tmp_path / "split", 4, *codes, "--resume_from_checkpoint", "latest")
    np.testing.assert_allclose(first["losses"] + second["losses"], whole["losses"], rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# GAN, semi-conditional
# ---------------------------------------------------------------------------------------------------------

def test_codes_are_drawn_from_their_distributions_and_predicted_on_their_supports():
    codes = draw_codes(list(CODE_DISTRIBUTIONS), 4, 2000, torch.Generator().manual_seed(0))
    bernoulli, exponential, uniform = codes.split(4, dim=1)
    assert codes.shape == (2000, 12) and set(bernoulli.unique().tolist()) == {0.0, 1.0}
    assert exponential.min() >= 0 and abs(exponential.mean().item() - 1.0) < 0.1
    assert uniform.min() >= -1 and uniform.max() <= 1 and abs(uniform.mean().item()) < 0.05
    squashed = squash_codes(torch.randn(50, 12) * 10, list(CODE_DISTRIBUTIONS), 4).split(4, dim=1)
    assert squashed[0].min() >= 0 and squashed[0].max() <= 1 and squashed[1].min() >= 0
    assert squashed[2].abs().max() <= 1


def test_semi_conditional_gan_trains_and_generates_an_unlabelled_pool(phantom_dir, tmp_path):
    output_dir = tmp_path / "run"
    train(train_gan, phantom_dir, output_dir, 3, "--code_distributions", "bernoulli,exponential,uniform",
          "--code_dims", "5")
    history = read_loss_history(output_dir / LOSS_HISTORY)
    assert len(history) == 3 and all(line["info"] > 0 and np.isfinite(line["code_prior"]) for line in history)
    pipe = MedaugGeneratorPipeline.from_medaug(output_dir)
    model = pipe.image_generator
    assert model.code_size == 15
    vectors = model.draw_vectors(2, torch.Generator().manual_seed(0))
    vectors[1, :model.config.noise_dim] = vectors[0, :model.config.noise_dim]  # same noise, another code
    with torch.no_grad():
        images = model.decode(vectors)
    assert (images[0] - images[1]).abs().max() > 1e-4  # the code reaches the image
    generate(output_dir, tmp_path / "synthetic", from_images=phantom_dir, max_sources=3)
    table = pd.read_csv(tmp_path / "synthetic" / "metadata.csv", dtype=str, keep_default_na=False)
    assert len(table) == 3 and set(table.get("label", [""])) == {""} and set(table.get("mask_file_name", [""])) == {""}
    folder, notes = synthetic_pool(tmp_path / "synthetic", phantom_dir)
    assert len(folder) == 3 and notes == []


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--code_distributions", "bernoulli,poisson"], r"--code_distributions: unknown distribution\(s\) \['poisson'\]"),
    (["--code_distributions", "uniform", "--code_dims", "0"], "--code_dims 0: must be at least 1"),
    (["--resolution", "30"], "--resolution 30: must be a multiple of 4"),
])
def test_bad_flags_are_refused_by_name(flags, message, phantom_dir, capsys):
    with pytest.raises(ValueError, match=message):
        train_gan.parse_args(["--train_data_dir", str(phantom_dir), *SMALL, *flags])
    with pytest.raises(SystemExit) as leaving, reporting_errors():
        train_gan.parse_args(["--train_data_dir", str(phantom_dir), *SMALL, *flags])
    assert leaving.value.code == 2 and "error: --" in capsys.readouterr().err


@pytest.mark.parametrize("script", [train_gan, train_autoencoder])
@pytest.mark.parametrize("condition, column", [("mask", "mask_file_name"), ("class", "label")])
def test_a_condition_without_its_column_is_refused(script, condition, column, phantom_copy, tmp_path):
    table = pd.read_csv(phantom_copy / "metadata.csv", dtype=str, keep_default_na=False)
    table.drop(columns=[column]).to_csv(phantom_copy / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=f"column '{column}': the column is missing; --condition {condition} needs"):
        train(script, phantom_copy, tmp_path / "run", 2, "--condition", condition)
    assert not (tmp_path / "run" / "medaug_args.json").exists()


def test_overwrite_removes_each_family_weight_folder_and_keeps_other_files(tmp_path):
    from medaug.training.run_folder import check_run_folder

    folders = (train_autoencoder.WEIGHTS_FOLDER, train_gan.WEIGHTS_FOLDER)
    for name in folders:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"stale")
    (tmp_path / "medaug_args.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    check_run_folder(tmp_path, resuming=False, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
