"""finetune.py --mask_channels: a UNet that reads the mask as extra input channels, the MedaugMaskPipeline that
feeds it, and `medaug generate --from_masks` with such a run; bad combinations refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medaug.generate import generate
from medaug.pipelines import MedaugMaskPipeline
from medaug.run_record import read_run_record
from medaug.scripts import finetune, train_controlnet
from medaug.training.mask_channels import latent_masks, widen_conv_in

FAST = {"num_inference_steps": 2}


def train_mask_run(base, data, output_dir, steps=2, *extra):
    arguments = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir",
                 str(output_dir), "--latent_cache_dir", str(output_dir.parent / "cache"), "--max_train_steps", str(steps),
                 "--train_batch_size", "4", "--report_to", "none", "--seed", "0", "--learning_rate", "2e-3",
                 "--train_mode", "full", "--mask_channels", "--condition_dropout", "0.2", *map(str, extra)]
    return finetune.main(finetune.parse_args(arguments))


@pytest.fixture(scope="module")
def mask_run(tiny_model_dir, phantom_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mask") / "run"
    train_mask_run(tiny_model_dir, phantom_dir, output_dir, 3, "--random_flip", "--validation_steps", "3",
                   "--num_validation_images", "2", "--validation_inference_steps", "2")
    return output_dir


def test_a_widened_conv_in_computes_what_it_did_before_training(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    latents, hidden = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(latents, 10, hidden).sample
        widen_conv_in(unet, 1)
        after = unet(torch.cat([latents, torch.rand(2, 1, 32, 32)], dim=1), 10, hidden).sample
    assert unet.config.in_channels == 5 and unet.conv_in.weight.shape[1] == 5
    torch.testing.assert_close(after, before)


def test_latent_masks_give_the_covered_share_of_each_cell():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :4, :2] = 1  # the left half of the top-left 4x4 cell
    cells = latent_masks(mask, 2)
    assert cells.shape == (1, 1, 2, 2) and cells[0, 0, 0, 0] == pytest.approx(0.5) and cells[0, 0, 1, 1] == 0


def test_a_mask_run_records_itself_and_generates_images_that_depend_on_the_mask(mask_run, phantom_dir, tmp_path):
    record = read_run_record(mask_run)
    assert record.unet_mask_channels == 1 and record.unet_train_mode == "full"
    assert (mask_run / "validation" / "step-000003.png").is_file()
    pipe = MedaugMaskPipeline.from_medaug(mask_run)
    assert pipe.unet.config.in_channels == 5
    square = np.zeros((64, 64), dtype=np.uint8)
    square[16:40, 16:40] = 1

    def sample(mask):
        return pipe(prompt="phantom ultrasound, round lesion", mask_image=mask, output_type="np",
                    generator=torch.Generator().manual_seed(0), **FAST).images

    assert np.abs(sample(square) - sample(np.roll(square, 20, axis=1))).max() > 1e-4
    summary = generate(mask_run, tmp_path / "synthetic", from_masks=phantom_dir, max_sources=3, num_per_source=2,
                       **FAST)
    assert summary["written"] == 6 and (tmp_path / "synthetic" / "masks").is_dir()


def test_mask_runs_refuse_what_cannot_work(mask_run, tiny_model_dir, phantom_dir, tmp_path):
    import shutil

    import pandas as pd

    from medaug.data import DatasetError

    data = shutil.copytree(phantom_dir, tmp_path / "data")
    table = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[0, "mask_file_name"] = ""
    table.to_csv(data / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match="row 1, column 'mask_file_name'.*--mask_channels needs this row's mask"):
        train_mask_run(tiny_model_dir, data, tmp_path / "run")
    with pytest.raises(ValueError, match="--mask_channels .* use --train_mode full"):
        finetune.parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                             str(phantom_dir), "--mask_channels"])
    with pytest.raises(ValueError, match="draws each image for a mask .* give --from_masks"):
        generate(mask_run, tmp_path / "out", prompt="phantom", **FAST)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="already reads the mask as input channels"):
        train_controlnet.parse_args(["--lora_dir", str(mask_run), "--train_data_dir", str(phantom_dir),
                                     "--edge_method", "mask_boundary"])
    pipe = MedaugMaskPipeline.from_medaug(mask_run)
    with pytest.raises(ValueError, match="mask_image: a mask-channel model needs the mask"):
        pipe(prompt="x", **FAST)
    with pytest.raises(ValueError, match="mask_image: size 32x48 differs from the output size 64x64"):
        pipe(prompt="x", mask_image=np.zeros((48, 32)), **FAST)


def test_the_clean_estimate_inverts_the_noising():
    from diffusers import DDPMScheduler

    from medaug.training.consistency import MaskConsistencyLoss

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([5, 200, 900])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    estimate = MaskConsistencyLoss.clean_estimate(type("L", (), {"scheduler": scheduler})(), noisy, timesteps, noise)
    torch.testing.assert_close(estimate, latents, atol=1e-4, rtol=1e-4)


def test_the_consistency_loss_changes_training_and_needs_mask_channels(tiny_model_dir, phantom_dir, tmp_path):
    from medaug.metrics.fidelity import train_fidelity_segmenter

    segmenter = train_fidelity_segmenter(phantom_dir, resolution=64, epochs=1, seed=1, batch_size=8)
    saved = segmenter.save(tmp_path / "segmenter")
    flags = ["--condition_dropout", "0", "--consistency_max_timestep", "1000"]  # every sample counts
    plain = train_mask_run(tiny_model_dir, phantom_dir, tmp_path / "plain", 2, *flags)
    weighted = train_mask_run(tiny_model_dir, phantom_dir, tmp_path / "consistency", 2, *flags,
                              "--consistency_segmenter", saved, "--consistency_weight", "1.0")
    assert all(np.isfinite(weighted["losses"]))
    assert weighted["losses"][0] > plain["losses"][0] + 1e-3  # the same step, with the segmenter's loss added
    with pytest.raises(ValueError, match="--consistency_segmenter .* needs --mask_channels"):
        finetune.parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                             str(phantom_dir), "--train_mode", "full", "--consistency_segmenter", str(saved)])
