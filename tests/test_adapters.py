"""Adapters trained elsewhere: a LoRA file saved as diffusers' own training scripts save one, and a ControlNet
folder from `save_pretrained`, generate through `medaug generate` with a base, as stock diffusers generates."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medaug.generate import job_seed
from tests.model_folders import model_folder, random_controlnet  # noqa: F401 (model_folder: a fixture)
from tests.test_bench_speed import load_benchmark
from tests.test_guards import run_command

PROMPT = "breast ultrasound, benign lesion"


def diffusers_lora_file(base, data, path):
    """A UNet LoRA trained by the stock-style loop of benchmarks/train_throughput.py (what diffusers'
    train_text_to_image_lora.py does per step) for a few steps, at a high learning rate so that it shows, and
    saved as that script saves it (`save_lora_weights`), under a name of the user's choosing."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    stock = load_benchmark("train_throughput")
    torch.manual_seed(0)
    parts = stock.load_baseline(base, rank=4, device="cpu")
    stock.train_baseline(parts, stock.baseline_loader(parts, data, num_rows=6, batch_size=2, seed=0), steps=3,
                         learning_rate=5e-2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(parts["unet"]))
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name,
                                              safe_serialization=True)
    return path


def stock_text_images(base, seed, lora_file=None):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if lora_file is not None:
        pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images[0]


def written_images(output_dir):
    table = pd.read_csv(output_dir / "metadata.csv")
    return [np.asarray(Image.open(output_dir / name).convert("RGB"), dtype=np.float32) / 255.0
            for name in table.file_name]


def generate(capsys, output_dir, *flags):
    # Stock diffusers' sampler and precision (the base's DDIM, fp32), so that only the adapter loading differs.
    code, stderr = run_command(["medaug", "generate", "--output_dir", output_dir, "--num_inference_steps", "2",
                                "--guidance_scale", "3", "--batch_size", "1", "--scheduler", "ddim", "--precision",
                                "fp32", *flags], capsys)
    assert code == 0, stderr
    return written_images(output_dir)


def test_a_diffusers_lora_file_generates_as_stock_diffusers_generates(tiny_model_dir, phantom_dir, tmp_path, capsys,
                                                                     one_torch_thread, monkeypatch):
    monkeypatch.setattr("medaug.training.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    lora = diffusers_lora_file(tiny_model_dir, phantom_dir, tmp_path / "their_lora.safetensors")
    images = generate(capsys, tmp_path / "out", "--base_model", tiny_model_dir, "--lora_weights", lora,
                      "--prompt", PROMPT, "--num_per_source", "2")
    assert len(images) == 2
    stock = stock_text_images(tiny_model_dir, job_seed(0, 0, 0), lora)
    bare = stock_text_images(tiny_model_dir, job_seed(0, 0, 0))
    assert np.abs(images[0] - stock).max() <= 2 / 255  # the LoRA fused in: float error, a grey level or two
    assert np.abs(images[0] - bare).mean() > 10 * np.abs(images[0] - stock).mean()  # and it does change the image
    line = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    adapter_run = next((tmp_path / "cache" / "adapters").iterdir())  # the run folder made for the adapter
    record = json.loads((adapter_run / "medaug_args.json").read_text())
    assert line["model_dir"] == str(adapter_run) and line["sha256"]
    assert record["arguments"]["lora_weights"] == str(lora) and record["unet_train_mode"] == "lora"


def test_a_controlnet_folder_steers_generation_from_masks(tiny_model_dir, phantom_dir, tmp_path, capsys,
                                                         one_torch_thread, monkeypatch):
    from diffusers import StableDiffusionControlNetPipeline, UNet2DConditionModel

    from medaug.data import DatasetFolder
    from medaug.edges import row_control_image

    monkeypatch.setattr("medaug.training.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    controlnet = random_controlnet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"))
    controlnet.save_pretrained(tmp_path / "their_controlnet", safe_serialization=True)
    output_dir = tmp_path / "out"
    images = generate(capsys, output_dir, "--base_model", tiny_model_dir, "--controlnet", tmp_path / "their_controlnet",
                      "--from_masks", phantom_dir, "--max_sources", "2")
    table = pd.read_csv(output_dir / "metadata.csv")
    assert len(images) == 2 and all((output_dir / name).is_file() for name in table.mask_file_name)

    folder = DatasetFolder(phantom_dir)
    first = folder.indices("train")[0]
    edges = row_control_image(folder, first, 64, method="mask_boundary")
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(tiny_model_dir, controlnet=controlnet,
                                                                 safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    stock = pipeline(folder.value(first, "text"), image=torch.from_numpy(edges.transpose(2, 0, 1))[None],
                     num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(job_seed(0, 0, 0))).images[0]
    assert np.abs(images[0] - stock).max() <= 2 / 255


def _foreign_controlnet(tiny_model_dir, path):
    """A ControlNet folder made for another UNet (wider cross-attention)."""
    from safetensors.torch import save_file

    path.mkdir()
    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "_class_name": "ControlNetModel",
                                                  "cross_attention_dim": 768}))
    save_file({"x": torch.zeros(1)}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


@pytest.mark.parametrize("case", ["pickle lora", "controlnet of another base", "model_dir and adapters", "no base"])
def test_adapters_that_cannot_work_are_refused_by_flag(case, tiny_model_dir, model_folder,  # noqa: F811
                                                       tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("medaug.training.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    pickled = tmp_path / "lora.bin"
    torch.save({"unet.weight": torch.zeros(1)}, pickled)
    flags, expected = {
        "pickle lora": (["--base_model", tiny_model_dir, "--lora_weights", pickled],
                        "--lora_weights: .*lora.bin is not a .safetensors file; medaug never loads pickle"),
        "controlnet of another base": (["--base_model", tiny_model_dir, "--controlnet",
                                        _foreign_controlnet(tiny_model_dir, tmp_path / "cn")],
                                       r"--controlnet: .*does not fit the base's UNet \(cross_attention_dim 768"),
        "model_dir and adapters": (["--model_dir", model_folder("text"), "--lora_weights", pickled],
                                   "give --model_dir .* or --lora_weights with --base_model, not both"),
        "no base": (["--lora_weights", pickled], r"give --model_dir \(a medaug run\), or --base_model"),
    }[case]
    code, stderr = run_command(["medaug", "generate", "--output_dir", tmp_path / "out", "--prompt", PROMPT, *flags],
                               capsys)
    assert code == 2 and stderr.startswith("error: "), stderr
    assert re.search(expected, stderr), stderr
    assert not (tmp_path / "out").exists()
