"""train_scripts/train_controlnet.py in-process: both training modes, stock loading, --lora_dir, edge sources,
resume, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.data import DatasetError
from medaug.run_record import RunRecord, write_run_record
from medaug.scripts import train_controlnet
from medaug.training.checkpoint import CheckpointError
from medaug.training.loss_log import LOSS_HISTORY, read_loss_history
from tests.conftest import shared_dataset



def run(data, output_dir, cache_dir, *extra, steps=2):
    args = ["--train_data_dir", str(data), "--output_dir", str(output_dir), "--latent_cache_dir", str(cache_dir),
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--max_train_samples", "4",
            "--report_to", "none", "--learning_rate", "1e-3", *map(str, extra)]
    return train_controlnet.main(train_controlnet.parse_args(args))


def stock_controlnet_images(base, controlnet_dir, control_image, seed=0):
    """Generate with stock diffusers classes only: the base folder and a saved controlnet/."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet, safety_checker=None,
                                                                 requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline("breast ultrasound, benign lesion", image=control_image, num_inference_steps=2, height=64,
                    width=64, output_type="np", guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(seed)).images


def untrained_controlnet(base, path):
    """A ControlNet copied from the UNet with its zero convolutions as made: it adds nothing yet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    args = train_controlnet.parse_args(["--pretrained_model_name_or_path", str(base), "--train_data_dir", ".",
                                        "--edge_method", "canny"])
    train_controlnet.build_controlnet(args, unet, vae).save_pretrained(path)
    return path


@pytest.fixture
def control_image(phantom_dir):
    from medaug.data import DatasetFolder
    from medaug.edges import row_control_image

    edges = row_control_image(DatasetFolder(phantom_dir), 0, 64, method="mask_boundary")
    return torch.from_numpy(edges.transpose(2, 0, 1))[None]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_each_mode_trains_a_controlnet_that_stock_diffusers_loads_and_that_changes_the_output(
        mode, tiny_model_dir, phantom_dir, control_image, tmp_path, one_torch_thread):
    output_dir = tmp_path / "out"
    summary = run(phantom_dir, output_dir, tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir,
                  "--edge_method", "mask_boundary", "--controlnet_train_mode", mode)
    assert summary["global_step"] == 2 and np.isfinite(summary["losses"]).all()
    run_args = json.loads((output_dir / "medaug_args.json").read_text())
    assert run_args["controlnet"] is True and run_args["edge_method"] == "mask_boundary"

    trained = stock_controlnet_images(tiny_model_dir, output_dir / "controlnet", control_image)
    untrained = stock_controlnet_images(tiny_model_dir, untrained_controlnet(tiny_model_dir, tmp_path / "zero"),
                                        control_image)
    assert trained.shape == (1, 64, 64, 3) and np.isfinite(trained).all()
    assert np.abs(trained - untrained).max() > 1e-3


def test_lora_mode_trains_adapters_on_the_copied_attention_and_saves_them_merged(tiny_model_dir, phantom_dir,
                                                                                  tmp_path, one_torch_thread):
    from diffusers import ControlNetModel

    run(phantom_dir, tmp_path / "out", tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir,
        "--edge_method", "canny", "--controlnet_train_mode", "lora", "--rank", "2")
    saved = ControlNetModel.from_pretrained(tmp_path / "out" / "controlnet").state_dict()
    copied = ControlNetModel.from_pretrained(untrained_controlnet(tiny_model_dir, tmp_path / "zero")).state_dict()
    assert set(saved) == set(copied)  # plain ControlNet weights: no LoRA keys left
    attention = [key for key in saved if key.endswith("attn1.to_q.weight")]
    convolutions = [key for key in saved if "resnets" in key and key.endswith("conv1.weight")]
    assert attention and convolutions
    assert all(not torch.equal(saved[key], copied[key]) for key in attention)  # LoRA merged in
    assert all(torch.equal(saved[key], copied[key]) for key in convolutions)  # frozen outside LoRA


def test_lora_dir_supplies_base_conditions_and_weights(tiny_model_dir, phantom_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from tests.test_finetune import run as run_finetune
    from tests.test_finetune import write_embeddings

    embeddings = write_embeddings(phantom_dir, tmp_path / "emb.safetensors", (384,))
    lora_dir = tmp_path / "lora"
    run_finetune(tiny_model_dir, phantom_dir, lora_dir, tmp_path / "cache", "--conditioning", "embedding",
                 "--embeddings_file", embeddings)
    output_dir = tmp_path / "out"
    run(phantom_dir, output_dir, tmp_path / "cache", "--lora_dir", lora_dir, "--edge_method", "fused")
    run_args = json.loads((output_dir / "medaug_args.json").read_text())
    assert run_args["base_model"] == str(tiny_model_dir.resolve()) and run_args["lora_dir"] == str(lora_dir)
    assert run_args["conditioning"] == "embedding"
    assert run_args["condition_settings"]["embeddings_file"] == str(embeddings.resolve())
    for name in ("pytorch_lora_weights.safetensors", "condition_encoder/diffusion_pytorch_model.safetensors"):
        assert load_file(output_dir / name).keys() == load_file(lora_dir / name).keys()
    projection = load_file(output_dir / "condition_encoder/diffusion_pytorch_model.safetensors")
    original = load_file(lora_dir / "condition_encoder/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(projection[key], original[key]) for key in original)  # kept frozen

    with pytest.raises(ValueError, match="--conditioning text: --lora_dir was trained with 'embedding'"):
        run(phantom_dir, tmp_path / "bad", tmp_path / "cache", "--lora_dir", lora_dir, "--edge_method", "canny",
            "--conditioning", "text")


def test_lora_dir_changes_what_the_controlnet_learns_from(tiny_model_dir, phantom_dir, tmp_path, one_torch_thread):
    """The LoRA of --lora_dir is fused into the frozen UNet, so the same ControlNet run sees other losses."""
    from tests.test_finetune import run as run_finetune

    lora_dir = tmp_path / "lora"
    run_finetune(tiny_model_dir, phantom_dir, lora_dir, tmp_path / "cache", "--train_mode", "full", steps=2)
    flags = ["--edge_method", "canny", "--condition_dropout", "0"]
    plain = run(phantom_dir, tmp_path / "a", tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir,
                *flags)
    tuned = run(phantom_dir, tmp_path / "b", tmp_path / "cache", "--lora_dir", lora_dir, *flags)
    assert abs(plain["losses"][0] - tuned["losses"][0]) > 1e-6
    assert (tmp_path / "b" / "unet" / "config.json").is_file()  # the full UNet travels with the output


def test_precomputed_edge_maps_are_read_from_the_column(tiny_model_dir, phantom_dir, tmp_path, one_torch_thread):
    from medaug.edges import write_edge_dataset

    edges_dir = write_edge_dataset(phantom_dir, tmp_path / "edges", "canny")
    summary = run(edges_dir, tmp_path / "out", tmp_path / "cache", "--pretrained_model_name_or_path",
                  tiny_model_dir, "--validation_steps", "2", "--num_validation_images", "2",
                  "--validation_inference_steps", "2")
    assert summary["global_step"] == 2
    from PIL import Image

    grid = Image.open(tmp_path / "out" / "validation" / "step-000002.png")
    assert grid.size == (128, 128)  # two columns, each an edge map above its generated image


def test_cached_and_per_step_edges_train_identically(tiny_model_dir, phantom_dir, tmp_path, one_torch_thread):
    # The data paths compared, at the precision where they differ by float error only.
    flags = ["--pretrained_model_name_or_path", tiny_model_dir, "--edge_method", "fused", "--condition_dropout",
             "0.3", "--mixed_precision", "no"]
    cached = run(phantom_dir, tmp_path / "a", tmp_path / "cache", *flags, steps=3)
    per_step = run(phantom_dir, tmp_path / "b", tmp_path / "cache", *flags, "--no_cache", steps=3)
    np.testing.assert_allclose(per_step["losses"], cached["losses"], rtol=1e-4)


def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, phantom_dir, tmp_path, one_torch_thread):
    flags = ["--pretrained_model_name_or_path", tiny_model_dir, "--edge_method", "mask_boundary",
             "--controlnet_train_mode", "lora", "--checkpointing_steps", "2", "--condition_dropout", "0.5"]
    whole = run(phantom_dir, tmp_path / "whole", tmp_path / "cache", *flags, steps=4)
    first = run(phantom_dir, tmp_path / "split", tmp_path / "cache", *flags, steps=2)
    second = run(phantom_dir, tmp_path / "split", tmp_path / "cache", *flags, "--resume_from_checkpoint", "latest",
                 steps=4)
    np.testing.assert_allclose(first["losses"] + second["losses"], whole["losses"], rtol=1e-4)
    history = read_loss_history(tmp_path / "split" / LOSS_HISTORY)
    assert [line["step"] for line in history] == [1, 2, 3, 4]
    np.testing.assert_allclose([line["loss"] for line in history], whole["losses"], rtol=1e-4)
    with pytest.raises(CheckpointError, match="edge_method: checkpoint has 'mask_boundary', this run has 'fused'"):
        run(phantom_dir, tmp_path / "split", tmp_path / "cache", *flags[:2], "--edge_method", "fused",
            *flags[4:], "--resume_from_checkpoint", "latest", steps=6)


def test_real_busi_masks(tiny_model_dir, tmp_path, one_torch_thread):
    busi = shared_dataset("busi")
    summary = run(busi, tmp_path / "out", tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir,
                  "--edge_method", "fused", "--resolution", "64")
    assert summary["global_step"] == 2 and np.isfinite(summary["losses"]).all()


# ---- bad input: stopped before training, naming the flag, column or rows ----


def test_missing_edge_column_is_named(tiny_model_dir, phantom_dir, tmp_path):
    with pytest.raises(DatasetError, match="conditioning_image_file_name.*pass --edge_method"):
        run(phantom_dir, tmp_path / "out", tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir)
    assert not (tmp_path / "out").exists()


def test_rows_without_masks_are_named_for_mask_methods(tiny_model_dir, phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    table = pd.read_csv(data / "metadata.csv", dtype=str)
    table.loc[1, "mask_file_name"] = ""
    table.to_csv(data / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=rf"row 2, column .mask_file_name.*{table.loc[1, 'file_name']}.*needs one"):
        run(data, tmp_path / "out", tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir,
            "--edge_method", "mask_boundary")


def test_edge_map_of_another_size_is_named(tiny_model_dir, phantom_dir, tmp_path):
    from PIL import Image

    from medaug.edges import write_edge_dataset

    edges_dir = write_edge_dataset(phantom_dir, tmp_path / "edges", "canny")
    name = pd.read_csv(edges_dir / "metadata.csv")["conditioning_image_file_name"][0]
    Image.new("RGB", (30, 30)).save(edges_dir / name)
    with pytest.raises(DatasetError, match=name):
        run(edges_dir, tmp_path / "out", tmp_path / "cache", "--pretrained_model_name_or_path", tiny_model_dir)


def test_base_needed_and_must_match_lora_dir(tiny_model_dir, phantom_dir, tmp_path):
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path or --lora_dir"):
        train_controlnet.parse_args(["--train_data_dir", str(phantom_dir), "--edge_method", "canny"])
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    write_run_record(lora_dir, RunRecord(base_model="someone/other-model", resolution=64, script="finetune"))
    with pytest.raises(ValueError, match="differs from the base of --lora_dir"):
        train_controlnet.parse_args(["--train_data_dir", str(phantom_dir), "--edge_method", "canny", "--lora_dir",
                                     str(lora_dir), "--pretrained_model_name_or_path", str(tiny_model_dir)])
