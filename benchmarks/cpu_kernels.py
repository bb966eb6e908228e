#!/usr/bin/env python
"""What each CPU speed option buys for one UNet: fp32 against bf16 autocast, bf16 weights, channels-last and
torch.compile, for a sampling forward pass and a LoRA training step, ratio against fp32 in one run.

    python benchmarks/cpu_kernels.py [--preset small] [--repeats 9] [--compile] [--output cpu_kernels.json]

The UNet is a from-scratch `medaug init-model` preset (small: 16.8 M parameters) at its base's resolution (128 px,
32x32 latents). Sampling: a batch of 16 latents (8 images and their unconditional halves, as `medaug generate`
runs them), no gradients. Both attend to 77 text-feature tokens, CLIP's length, as finetune.py's cached features do.
Training: batch 4, LoRA rank 4 on the attention projections (medaug.training.lora), MSE backward and an AdamW step on
the adapters; one variant with medaug.models.attention's matmul-backward attention, which finetune.py uses for bf16 on
a CPU. Each variant is timed --repeats times after one warm-up call, the variants in turn within each round; medians
and the fastest run are printed. With --compile, `torch.compile` (inductor) is timed too: its first call (the compile)
apart from its steady state.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medaug.models.attention import use_matmul_backward_attention
from medaug.models.tokenizer import MODEL_MAX_LENGTH


def load_unet(preset: str):
    from diffusers import UNet2DConditionModel

    from medaug.models import init_model

    with tempfile.TemporaryDirectory() as folder:
        init_model(Path(folder) / "base", preset=preset, prompts=["a"])
        return UNet2DConditionModel.from_pretrained(Path(folder) / "base" / "unet").eval()


def timed(calls: dict, repeats: int) -> dict:
    """Each call's first-call seconds and median and fastest ms over `repeats` rounds; the rounds visit every call in
    turn, so that a slow minute of a shared machine falls on every variant alike."""
    results, seconds = {}, {name: [] for name in calls}
    for name, call in calls.items():
        started = time.perf_counter()
        call()
        results[name] = {"first_call_s": time.perf_counter() - started}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - started)
    for name, row in results.items():
        row.update(median_ms=1000 * statistics.median(seconds[name]), min_ms=1000 * min(seconds[name]))
    return results


def inputs(unet, batch: int, channels_last: bool = False):
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    if channels_last:
        latents = latents.to(memory_format=torch.channels_last)
    hidden = torch.randn(batch, MODEL_MAX_LENGTH, unet.config.cross_attention_dim)  # as finetune.py's cached features
    return latents, torch.randint(0, 1000, (batch,)), hidden


def sampling_variants(unet, options) -> dict:
    channels_last = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    variants = {"fp32": (unet, False, False), "bf16 autocast": (unet, True, False),
                "fp32 channels-last": (channels_last, False, True),
                "bf16 autocast, channels-last": (channels_last, True, True)}
    if options.compile:
        variants["bf16 autocast, torch.compile"] = (torch.compile(copy.deepcopy(unet)), True, False)
    calls = {}
    for name, (model, autocast, channels_last) in variants.items():
        latents, timesteps, hidden = inputs(unet, 16, channels_last)
        calls[name] = sampling_call(model, autocast, latents, timesteps, hidden)
    return timed(calls, options.repeats)


def sampling_call(model, autocast: bool, latents, timesteps, hidden):
    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(latents, timesteps, hidden)

    return call


def lora_unet(unet, frozen_dtype):
    from medaug.training.lora import UNET_TARGETS, add_lora

    model = copy.deepcopy(unet).requires_grad_(False).to(frozen_dtype)
    add_lora(model, 4, UNET_TARGETS)
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in adapters:
        parameter.data = parameter.data.float()
    return model.train(), torch.optim.AdamW(adapters, lr=1e-4)


def training_variants(unet, options) -> dict:
    variants = {"fp32": (torch.float32, False, False),
                "bf16 autocast, fp32 frozen weights": (torch.float32, True, False),
                "bf16 autocast, bf16 frozen weights": (torch.bfloat16, True, False),
                "bf16, bf16 frozen, matmul-backward attention": (torch.bfloat16, True, True)}
    if options.compile:
        variants["bf16, bf16 frozen, matmul-backward attention, torch.compile"] = (torch.bfloat16, True, True)
    calls = {}
    for name, (frozen_dtype, autocast, matmul_backward) in variants.items():
        model, optimizer = lora_unet(unet, frozen_dtype)
        if matmul_backward:
            use_matmul_backward_attention(model)
        if name.endswith("torch.compile"):
            model = torch.compile(model)
        calls[name] = training_call(model, optimizer, autocast, *inputs(unet, 4))
    return timed(calls, options.repeats)


def training_call(model, optimizer, autocast: bool, latents, timesteps, hidden):
    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            prediction = model(latents, timesteps, hidden).sample
        torch.nn.functional.mse_loss(prediction.float(), latents).backward()
        optimizer.step()
        optimizer.zero_grad()

    return call


def print_block(title: str, results: dict) -> None:
    base = results["fp32"]["median_ms"]
    print(f"{title}\n  {'variant':60} {'median ms':>10} {'min ms':>8} {'vs fp32':>8} {'first call s':>13}")
    for name, row in results.items():
        print(f"  {name:60} {row['median_ms']:10.1f} {row['min_ms']:8.1f} {base / row['median_ms']:7.2f}x "
              f"{row['first_call_s']:13.1f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compile", action="store_true",
                        help="Also time torch.compile for sampling and training (minutes to compile).")
    parser.add_argument("--output", default="cpu_kernels.json")
    options = parser.parse_args(argv)
    unet = load_unet(options.preset)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "preset": options.preset, "load_average_at_start": list(os.getloadavg()),
               "sampling_batch_16": sampling_variants(unet, options),
               "lora_training_step_batch_4": training_variants(unet, options)}
    results["load_average_at_end"] = list(os.getloadavg())
    results["ratio"] = {f"{block}: {name}": results[block]["fp32"]["median_ms"] / row["median_ms"]
                        for block in ("sampling_batch_16", "lora_training_step_batch_4")
                        for name, row in results[block].items()}
    print_block("sampling forward, batch 16", results["sampling_batch_16"])
    print_block("LoRA training step, batch 4", results["lora_training_step_batch_4"])
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
