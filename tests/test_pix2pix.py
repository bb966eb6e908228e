"""train_pix2pix.py: it learns (L1 falls), resumes to the uninterrupted run, saves a run folder that stock
`from_pretrained` and `medaug generate --from_masks` read, and refuses rows without masks."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.data import DatasetError
from medaug.generate import generate
from medaug.models.pix2pix import Pix2PixGenerator
from medaug.pipelines import MedaugPix2PixPipeline
from medaug.run_record import read_run_record
from medaug.scripts import train_pix2pix


def train(data, output_dir, steps, *extra):
    arguments = ["--train_data_dir", str(data), "--output_dir", str(output_dir), "--max_train_steps", str(steps),
                 "--train_batch_size", "4", "--resolution", "64", "--checkpointing_steps", "3",
                 "--generator_channels", "8,16,32", "--random_flip", *map(str, extra)]
    return train_pix2pix.main(train_pix2pix.parse_args(arguments))


@pytest.fixture(scope="module")
def pix2pix_run(phantom_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pix2pix") / "run"
    summary = train(phantom_dir, output_dir, 40, "--validation_steps", "40", "--learning_rate", "2e-3")
    return output_dir, summary


def test_it_learns_and_writes_a_run_folder(pix2pix_run):
    output_dir, summary = pix2pix_run
    from medaug.training.loss_log import LOSS_HISTORY, read_loss_history

    l1 = [line["l1"] for line in read_loss_history(output_dir / LOSS_HISTORY)]
    assert len(l1) == 40 and np.mean(l1[-5:]) < 0.8 * np.mean(l1[:5])
    record = read_run_record(output_dir)
    assert record.generator == "pix2pix" and record.channels == 1 and record.base_model == ""
    assert (output_dir / "validation" / "step-000040.png").is_file() and (output_dir / "README.md").is_file()
    model = Pix2PixGenerator.from_pretrained(output_dir / "pix2pix")
    assert model.config.out_channels == 1


def test_resumed_run_equals_uninterrupted_run(phantom_dir, tmp_path):
    whole = train(phantom_dir, tmp_path / "whole", 6)
    first = train(phantom_dir, tmp_path / "split", 3)
    second = train(phantom_dir, tmp_path / "split", 6, "--resume_from_checkpoint", "latest")
    np.testing.assert_allclose(first["losses"] + second["losses"], whole["losses"], rtol=1e-4)


def test_generate_from_masks_and_the_pipeline_round_trip(pix2pix_run, phantom_dir, tmp_path):
    output_dir, _ = pix2pix_run
    summary = generate(output_dir, tmp_path / "synthetic", from_masks=phantom_dir, max_sources=3, num_per_source=2)
    assert summary["written"] == 6
    pipe = MedaugPix2PixPipeline.from_medaug(output_dir)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:40, 20:40] = 1
    first = pipe(mask_image=mask, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path / "saved")
    again = MedaugPix2PixPipeline.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(again(mask_image=mask, generator=torch.Generator().manual_seed(0),
                                     output_type="np").images, first, atol=1e-6)
    with pytest.raises(ValueError, match="mask_image: pix2pix draws an image for a mask"):
        pipe()


def test_rows_without_masks_are_refused(phantom_dir, tmp_path):
    data = shutil.copytree(phantom_dir, tmp_path / "data")
    table = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[2, "mask_file_name"] = ""
    table.to_csv(data / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match="row 3, column 'mask_file_name'.*pix2pix needs this row's mask"):
        train(data, tmp_path / "run", 2)
    with pytest.raises(ValueError, match="--resolution 62: must be a multiple of 4"):
        train_pix2pix.parse_args(["--train_data_dir", str(data), "--resolution", "62", "--generator_channels",
                                  "8,16,32"])
