"""train_scripts/finetune.py in-process: each conditioning type, loss, resume, cache, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.data import DatasetError
from medaug.embeddings import EmbeddingError, save_embeddings
from medaug.scripts import finetune
from medaug.training.checkpoint import CheckpointError
from medaug.training.loss_log import LOSS_HISTORY, read_loss_history
from tests.conftest import REPO_ROOT, shared_dataset


ELIXR_SHAPE = (32, 768)  # chest X-ray foundation-model embeddings: 32 tokens of 768
PATH_FOUNDATION_SHAPE = (384,)  # histopathology foundation-model embedding: one vector


def write_embeddings(folder, path, shape, seed=0):
    names = pd.read_csv(folder / "metadata.csv", dtype=str)["file_name"]
    rng = np.random.default_rng(seed)
    save_embeddings(path, {name: rng.normal(size=shape).astype(np.float32) for name in names})
    return path


def run(base, data, output_dir, cache_dir, *extra, steps=2):
    args = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir",
            str(output_dir), "--latent_cache_dir", str(cache_dir), "--max_train_steps", str(steps), "--train_batch_size", "2",
            "--max_train_samples", "4", "--report_to", "none", "--learning_rate", "1e-3", "--seed", "0",
            *map(str, extra)]
    return finetune.main(finetune.parse_args(args))


def conditioning_flags(kind, data, tmp_path, shape=ELIXR_SHAPE):
    if kind == "embedding":
        embeddings_file = write_embeddings(data, tmp_path / "emb.safetensors", shape)
        return ["--conditioning", kind, "--embeddings_file", embeddings_file]
    return ["--conditioning", kind]


def condition_embeddings(pipeline, projection, run_args, data):
    """What a user's generation code computes from the output folder for the first training row."""
    from medaug.conditioning import ClipImageCondition
    from medaug.data import DatasetFolder
    from medaug.embeddings import load_embeddings

    folder = DatasetFolder(data)
    row = folder.indices("train")[0]
    if run_args["conditioning"] == "text":
        return pipeline.encode_prompt(folder.value(row, "text"), "cpu", 1, True, "")
    if run_args["conditioning"] == "clip_image":
        condition = ClipImageCondition(pipeline.image_encoder, pipeline.feature_extractor, projection)
        features = condition.features([folder.path(row, "file_name")])
    else:
        embeddings = load_embeddings(run_args["embeddings_file"])
        features = torch.from_numpy(embeddings[folder.value(row, "file_name")])[None]
    with torch.no_grad():
        return projection(features), projection.unconditional_embedding(1)


def generate(pipeline, embeddings):
    prompt_embeds, negative = embeddings
    return pipeline(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=2,
                    height=64, width=64, output_type="np", guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0)).images


def assert_output_folder_changes_generation(output_dir, base, data):
    """A user's own stock-diffusers code, with only the folder's files: the LoRA, condition_encoder/, the record."""
    from diffusers import StableDiffusionPipeline

    from medaug.conditioning import ConditionProjection

    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    record = json.loads((output_dir / "medaug_args.json").read_text())
    run_args = {"conditioning": record["conditioning"], **record["condition_settings"]}

    def stock_pipeline():
        return StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)

    tuned, stock = stock_pipeline(), stock_pipeline()
    tuned.load_lora_weights(str(output_dir))
    encoder_dir = output_dir / "condition_encoder"
    projection = ConditionProjection.from_pretrained(encoder_dir) if encoder_dir.is_dir() else None
    embeddings = condition_embeddings(tuned, projection, run_args, data)
    tuned_images, stock_images = generate(tuned, embeddings), generate(stock, embeddings)
    assert tuned_images.shape == (1, 64, 64, 3) and np.isfinite(tuned_images).all()
    assert np.abs(tuned_images - stock_images).max() > 1e-3


@pytest.mark.parametrize("kind", ["text", "clip_image", "embedding"])
def test_each_conditioning_writes_an_output_folder_that_changes_generation(kind, tiny_model_dir, phantom_dir, tmp_path):
    output_dir = tmp_path / "out"
    summary = run(tiny_model_dir, phantom_dir, output_dir, tmp_path / "cache",
                  *conditioning_flags(kind, phantom_dir, tmp_path))
    assert summary["global_step"] == 2 and len(summary["losses"]) == 2
    assert (output_dir / "condition_encoder").is_dir() == (kind != "text")
    assert_output_folder_changes_generation(output_dir, tiny_model_dir, phantom_dir)


@pytest.mark.parametrize("kind", ["text", "clip_image", "embedding"])
def test_each_conditioning_on_real_busi_images(kind, tiny_model_dir, tmp_path):
    busi = shared_dataset("busi")
    output_dir = tmp_path / "out"
    run(tiny_model_dir, busi, output_dir, tmp_path / "cache", "--resolution", "64",
        *conditioning_flags(kind, busi, tmp_path, PATH_FOUNDATION_SHAPE))
    assert_output_folder_changes_generation(output_dir, tiny_model_dir, busi)


@pytest.mark.parametrize("kind", ["text", "clip_image", "embedding"])
def test_loss_falls_on_a_fixed_batch(kind, tiny_model_dir, phantom_dir, tmp_path):
    summary = run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", "--train_mode", "full",
                  "--max_train_samples", "2", "--condition_dropout", "0", "--checkpointing_steps", "1000",
                  *conditioning_flags(kind, phantom_dir, tmp_path), steps=50)
    losses = np.array(summary["losses"])
    assert losses[-10:].mean() < 0.85 * losses[:3].mean(), losses  # most of the fall is early


def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, phantom_dir, tmp_path):
    flags = ["--checkpointing_steps", "3", "--condition_dropout", "0.5", "--random_flip", "--max_train_samples", "6",
             "--conditioning", "embedding", "--embeddings_file",
             write_embeddings(phantom_dir, tmp_path / "emb.safetensors", (384,))]
    whole = run(tiny_model_dir, phantom_dir, tmp_path / "whole", tmp_path / "cache", *flags, steps=6)
    first = run(tiny_model_dir, phantom_dir, tmp_path / "split", tmp_path / "cache", *flags, steps=3)
    assert (tmp_path / "split" / "checkpoint-3").is_dir()
    second = run(tiny_model_dir, phantom_dir, tmp_path / "split", tmp_path / "cache", *flags,
                 "--resume_from_checkpoint", "latest", steps=6)
    assert len(second["losses"]) == 3
    np.testing.assert_allclose(first["losses"] + second["losses"], whole["losses"], rtol=1e-4)
    history = read_loss_history(tmp_path / "split" / LOSS_HISTORY)  # one line per step, none repeated
    assert [line["step"] for line in history] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([line["loss"] for line in history], whole["losses"], rtol=1e-4)


def test_default_run_writes_tensorboard_events_and_the_loss_history(tiny_model_dir, phantom_dir, tmp_path):
    output_dir = tmp_path / "out"
    args = finetune.parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                                str(phantom_dir), "--output_dir", str(output_dir), "--latent_cache_dir",
                                str(tmp_path / "cache"), "--max_train_steps", "3", "--train_batch_size", "2"])
    assert args.report_to == "tensorboard"
    summary = finetune.main(args)
    history = read_loss_history(output_dir / LOSS_HISTORY)
    assert [line["step"] for line in history] == [1, 2, 3]
    np.testing.assert_allclose([line["loss"] for line in history], summary["losses"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under logs/"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = [event.value for event in accumulator.Scalars("train_loss")]
    np.testing.assert_allclose(logged, summary["losses"], rtol=1e-6)


def test_cache_is_reused_and_invalidated_by_resolution(tiny_model_dir, phantom_dir, tmp_path):
    cache = tmp_path / "cache"
    assert set(run(tiny_model_dir, phantom_dir, tmp_path / "a", cache, steps=1)["computed"]) == {
        "latents", "text-features"}
    assert run(tiny_model_dir, phantom_dir, tmp_path / "b", cache, steps=1)["computed"] == []
    assert run(tiny_model_dir, phantom_dir, tmp_path / "c", cache, "--resolution", "32", steps=1)["computed"] == [
        "latents"]
    assert run(tiny_model_dir, phantom_dir, tmp_path / "d", cache, "--no_cache", "--resolution", "48",
               steps=1)["computed"] == []
    assert len(list(cache.glob("latents-*.safetensors"))) == 2  # --no_cache neither reads nor writes


@pytest.mark.parametrize("kind", ["text", "clip_image"])
def test_cached_and_per_step_encoding_train_identically(kind, tiny_model_dir, phantom_dir, tmp_path):
    # The data paths compared, at the precision where they differ by float error only.
    flags = ["--conditioning", kind, "--random_flip", "--condition_dropout", "0.3", "--mixed_precision", "no"]
    cached = run(tiny_model_dir, phantom_dir, tmp_path / "a", tmp_path / "cache", *flags, steps=4)
    per_step = run(tiny_model_dir, phantom_dir, tmp_path / "b", tmp_path / "cache", *flags, "--no_cache", steps=4)
    np.testing.assert_allclose(per_step["losses"], cached["losses"], rtol=1e-4)


def test_checkpoints_are_pruned_and_validation_grid_written(tiny_model_dir, phantom_dir, tmp_path):
    output_dir = tmp_path / "out"
    run(tiny_model_dir, phantom_dir, output_dir, tmp_path / "cache", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--validation_steps", "3", "--num_validation_images", "2",
        "--validation_inference_steps", "2", steps=3)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    from PIL import Image

    grid = Image.open(output_dir / "validation" / "step-000003.png")
    assert grid.size == (128, 64)  # two 64 px images side by side


# ---- bad input: each stops before training with an error naming the culprit ----


def test_embedding_of_the_wrong_width_is_named(tiny_model_dir, phantom_dir, tmp_path):
    path = write_embeddings(phantom_dir, tmp_path / "emb.safetensors", (384,))
    from safetensors.numpy import load_file

    table = load_file(str(path))
    table["images/irregular_0001.png"] = np.zeros(383, dtype=np.float32)
    save_embeddings(path, table)
    with pytest.raises(EmbeddingError, match=r"'images/irregular_0001.png' has shape \(383,\), expected \(384,\)"):
        run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", "--conditioning", "embedding",
            "--embeddings_file", path)


def test_nan_and_missing_embeddings_are_named(tiny_model_dir, phantom_dir, tmp_path):
    path = write_embeddings(phantom_dir, tmp_path / "emb.safetensors", (16,))
    from safetensors.numpy import load_file

    table = load_file(str(path))
    table["images/round_0000.png"][3] = np.nan
    save_embeddings(path, table)
    flags = ["--conditioning", "embedding", "--embeddings_file", path]
    with pytest.raises(EmbeddingError, match="'images/round_0000.png' contains NaN"):
        run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", *flags)
    del table["images/round_0000.png"]
    save_embeddings(path, table)
    with pytest.raises(EmbeddingError, match="no embedding for 1 row.*images/round_0000.png"):
        run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", *flags)


def test_empty_caption_column_is_named(tiny_model_dir, phantom_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    table = pd.read_csv(data / "metadata.csv", dtype=str)
    table.loc[1, "text"] = ""
    table.to_csv(data / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'text' is empty in 1 row\(s\) \(rows 2\)"):
        run(tiny_model_dir, data, tmp_path / "out", tmp_path / "cache")
    with pytest.raises(ValueError, match="--caption_column: column 'caption' not in"):
        run(tiny_model_dir, data, tmp_path / "out", tmp_path / "cache", "--caption_column", "caption")


def test_base_without_image_encoder_is_named(tiny_model_dir, phantom_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    shutil.rmtree(base / "image_encoder")
    with pytest.raises(ValueError, match=f"{base} has no image_encoder/ folder"):
        run(base, phantom_dir, tmp_path / "out", tmp_path / "cache", "--conditioning", "clip_image")


def test_resolution_the_model_cannot_divide_is_named(tiny_model_dir, phantom_dir, tmp_path):
    with pytest.raises(ValueError, match="--resolution 66: must be a multiple of 4"):
        run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", "--resolution", "66")


def test_checkpoint_from_another_configuration_is_named(tiny_model_dir, phantom_dir, tmp_path):
    run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", "--checkpointing_steps", "1", steps=1)
    with pytest.raises(CheckpointError, match="checkpoint-1: checkpoint from another configuration; rank: "
                                              "checkpoint has 4, this run has 8"):
        run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", "--rank", "8",
            "--resume_from_checkpoint", "latest", steps=2)


def test_bad_flags_are_refused_before_loading(tmp_path, phantom_dir):
    base = ["--train_data_dir", str(phantom_dir)]
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path: .* is not a diffusers model folder"):
        finetune.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "nothing"), *base])
    with pytest.raises(ValueError, match="--embeddings_file is required"):
        finetune.parse_args(["--pretrained_model_name_or_path", "org/model", *base, "--conditioning", "embedding"])
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        run("org/model", phantom_dir, tmp_path / "out", tmp_path / "cache", "--split", "holdout")


def test_accelerate_launch_with_two_cpu_processes(tiny_model_dir, phantom_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    accelerate = Path(sys.executable).parent / "accelerate"
    # accelerate's --cpu flag starts a single process unless MPI is installed; --multi_gpu starts two through
    # torchrun, and the script's Accelerator(cpu=True) joins them in a CPU (gloo) group.
    command = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train_scripts" / "finetune.py"),
               "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(phantom_dir),
               "--output_dir", str(tmp_path / "out"), "--latent_cache_dir", str(tmp_path / "cache"), "--max_train_steps", "2",
               "--train_batch_size", "2", "--checkpointing_steps", "1", "--report_to", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "medaug_args.json").read_text())
    assert record["num_processes"] == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "unet.safetensors").is_file()


def test_text_encoder_lora_and_loss_options_train_and_save(tiny_model_dir, phantom_dir, tmp_path):
    from safetensors.torch import load_file

    summary = run(tiny_model_dir, phantom_dir, tmp_path / "out", tmp_path / "cache", "--train_text_encoder",
                  "--snr_gamma", "5", "--prediction_type", "v_prediction", "--gradient_accumulation_steps", "2",
                  "--noise_offset", "0.05", "--gradient_checkpointing", steps=2)
    assert summary["global_step"] == 2 and np.isfinite(summary["losses"]).all()
    keys = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")).keys()
    assert any(key.startswith("text_encoder.") for key in keys) and any(key.startswith("unet.") for key in keys)
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                       requires_safety_checker=False)
    before = pipeline.encode_prompt("breast ultrasound", "cpu", 1, False)[0]
    pipeline.load_lora_weights(str(tmp_path / "out"))
    after = pipeline.encode_prompt("breast ultrasound", "cpu", 1, False)[0]
    assert not torch.allclose(before, after)  # the text encoder's LoRA was saved and loads
