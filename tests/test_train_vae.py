"""train_scripts/train_vae.py: a from-scratch VAE learns to reconstruct, and finetune.py picks it up."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import AutoencoderKL

from medaug.scripts import finetune, train_vae
from medaug.training.loss_log import read_loss_history




@pytest.fixture
def base_copy(tiny_model_dir, tmp_path):
    """train_vae.py writes into the base folder, so each test gets its own copy."""
    return shutil.copytree(tiny_model_dir, tmp_path / "base")


def test_vae_learns_and_is_written_back_with_its_scaling_factor(base_copy, phantom_dir, tmp_path):
    report = train_vae.main(train_vae.parse_args([
        "--pretrained_model_name_or_path", str(base_copy), "--train_data_dir", str(phantom_dir),
        "--max_train_steps", "15", "--train_batch_size", "4", "--learning_rate", "1e-3"]))
    before, after = report["before_training"], report["after_training"]
    assert after["psnr"]["n"] == 4  # the phantom's test split
    assert after["psnr"]["mean"] > before["psnr"]["mean"] + 3.0
    assert after["ssim"]["mean"] > before["ssim"]["mean"]
    saved = json.loads((base_copy / "vae" / "vae_eval.json").read_text())
    assert saved["after_training"] == after
    history = read_loss_history(saved["loss_history"])
    assert [line["step"] for line in history] == list(range(1, 16))
    np.testing.assert_allclose([line["loss"] for line in history], report["losses"])
    vae = AutoencoderKL.from_pretrained(base_copy, subfolder="vae")
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"]) and vae.config.scaling_factor != 1.0


def test_finetune_re_encodes_latents_after_the_vae_changes(base_copy, phantom_dir, tmp_path):
    def finetune_once(name):
        return finetune.main(finetune.parse_args([
            "--pretrained_model_name_or_path", str(base_copy), "--train_data_dir", str(phantom_dir),
            "--output_dir", str(tmp_path / name), "--latent_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "1",
            "--max_train_samples", "2", "--train_batch_size", "2", "--report_to", "none"]))

    assert "latents" in finetune_once("a")["computed"]
    assert finetune_once("b")["computed"] == []
    train_vae.main(train_vae.parse_args([
        "--pretrained_model_name_or_path", str(base_copy), "--train_data_dir", str(phantom_dir),
        "--max_train_steps", "1", "--train_batch_size", "2", "--max_eval_images", "1"]))
    assert finetune_once("c")["computed"] == ["latents"]


def test_bad_base_and_resolution_are_named(base_copy, phantom_dir, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nowhere'} has no vae/ folder"):
        train_vae.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "nowhere"),
                              "--train_data_dir", str(phantom_dir)])
    with pytest.raises(ValueError, match="--resolution 63: must be a multiple of 2"):
        train_vae.main(train_vae.parse_args(["--pretrained_model_name_or_path", str(base_copy),
                                             "--train_data_dir", str(phantom_dir), "--resolution", "63"]))
