#!/usr/bin/env python
"""Training images/s and peak memory of finetune.py against a stock-style LoRA loop that encodes every step.

    python benchmarks/train_throughput.py --presets tiny,small --steps 20,10 --batch_size 4 \
        [--data ../shared/datasets/busi] [--device cpu] [--output train_throughput.json]

The baseline does per step what diffusers' `train_text_to_image_lora.py` example does: encode the batch's
images with the VAE (`latent_dist.sample() * scaling_factor`) and its prompts with the text encoder, fp32,
PEFT LoRA on the UNet's attention projections, DDPM noise and timesteps, MSE on epsilon, AdamW. It is
written here from that description, not copied. finetune.py runs its default path: cached latents and text
features, cached unconditional embedding, LoRA, `--mixed_precision auto` (bf16 autocast where the device computes
bf16 natively, with fp32 trained weights); a third arm, finetune_fp32, runs the same with `--mixed_precision no`, to
show what the precision buys apart from the rest. The arms get the same from-scratch base, the same rows (the first
steps x batch training rows, each seen once), batch, steps and LoRA rank, and each runs in its own
subprocess so that its peak memory is its own. Timed steps exclude one-off setup; finetune.py's cache fill
(VAE and text encoder over every row, a fresh cache each run) is reported beside them. With --repeats N the
arms run N times each, rotating which goes first, and medians are reported with the spread (a shared machine is
noisy). Quality: each arm's mean loss over its last half of steps (same rows, seed and schedule), printed beside the
speed. The JSON's top-level "ratio" holds finetune.py's default against the baseline per preset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "busi"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ARMS = ("finetune", "finetune_fp32", "baseline")


# ---------------------------------------------------------------------------------------------------------
# The baseline: a stock-style LoRA loop
# ---------------------------------------------------------------------------------------------------------

def load_baseline(base: str | Path, rank: int, device: str) -> dict:
    """The base model's parts, frozen, with a PEFT LoRA adapter on the UNet (rank = alpha, Gaussian A, zero B)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {"tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
             "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
             "vae": AutoencoderKL.from_pretrained(base, subfolder="vae"),
             "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
             "scheduler": DDPMScheduler.from_pretrained(base, subfolder="scheduler")}
    if parts["scheduler"].config.prediction_type != "epsilon":
        raise ValueError(f"{base}: the baseline trains on epsilon; the scheduler predicts "
                         f"{parts['scheduler'].config.prediction_type}")
    for name in ("text_encoder", "vae", "unet"):
        parts[name].requires_grad_(False)
        parts[name].to(device)
    parts["unet"].add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
    return parts


def baseline_resolution(parts: dict) -> int:
    vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return parts["unet"].config.sample_size * vae_scale


def baseline_loader(parts: dict, data: str | Path, num_rows: int, batch_size: int, seed: int):
    """Pixels decoded from disk and prompts tokenised for every batch, as the example's transforms do."""
    from medaug.data import MedicalImageDataset

    dataset = MedicalImageDataset(data, split="train", resolution=baseline_resolution(parts), channels=3, fit="pad")
    dataset.indices = dataset.indices[:num_rows]
    tokenizer = parts["tokenizer"]

    def collate(samples):
        ids = tokenizer([s["text"] for s in samples], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return torch.stack([s["pixel_values"] for s in samples]), ids

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       collate_fn=collate, generator=torch.Generator().manual_seed(seed))


def baseline_step(parts: dict, pixels, input_ids, optimizer, parameters, max_grad_norm: float = 1.0) -> float:
    vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
    device = unet.device
    latents = vae.encode(pixels.to(device)).latent_dist.sample() * vae.config.scaling_factor
    hidden = parts["text_encoder"](input_ids.to(device), return_dict=False)[0]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden, return_dict=False)[0]
    loss = F.mse_loss(prediction.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def train_baseline(parts: dict, loader, steps: int, learning_rate: float = 1e-4) -> dict:
    """Run `steps` optimizer steps (cycling the loader); steps/s counts every step from the first, as finetune.py."""
    parameters = [p for p in parts["unet"].parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    losses = []
    started = time.perf_counter()
    while len(losses) < steps:
        for pixels, input_ids in loader:
            losses.append(baseline_step(parts, pixels, input_ids, optimizer, parameters))
            if len(losses) == steps:
                break
    seconds = time.perf_counter() - started
    return {"losses": losses, "train_seconds": seconds, "steps_per_second": steps / seconds,
            "trainable_parameters": sum(p.numel() for p in parameters)}


# ---------------------------------------------------------------------------------------------------------
# The two arms, each run in its own process
# ---------------------------------------------------------------------------------------------------------

def run_baseline_arm(options) -> dict:
    # Imported before the clock starts, as finetune.py's are when its module loads.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from medaug.data import MedicalImageDataset  # noqa: F401

    torch.manual_seed(options.seed)
    started = time.perf_counter()
    parts = load_baseline(options.base, options.rank, options.device)
    loader = baseline_loader(parts, options.data, options.steps * options.batch_size, options.batch_size,
                             options.seed)
    setup = time.perf_counter() - started
    result = train_baseline(parts, loader, options.steps)
    return {**result, "setup_seconds": setup, "cache_fill_seconds": 0.0, "resolution": baseline_resolution(parts)}


def load_finetune():
    from medaug.scripts import finetune

    return finetune


def run_finetune_arm(options, precision: str = "auto") -> dict:
    finetune = load_finetune()

    class TimedCache(finetune.TensorCache):
        """finetune.py's cache, timing its fills so they are reported rather than hidden in setup."""
        seconds = 0.0

        def load_or_compute(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().load_or_compute(*args, **kwargs)
            finally:
                TimedCache.seconds += time.perf_counter() - started

    finetune.TensorCache = TimedCache
    work = Path(options.work)
    args = ["--pretrained_model_name_or_path", options.base, "--train_data_dir", options.data,
            "--output_dir", str(work / "finetune-out"), "--latent_cache_dir", str(work / "finetune-cache"),
            "--max_train_steps", str(options.steps), "--train_batch_size", str(options.batch_size),
            "--max_train_samples", str(options.steps * options.batch_size), "--rank", str(options.rank),
            "--seed", str(options.seed), "--mixed_precision", precision, "--report_to", "none",
            "--checkpointing_steps", "1000000"]
    started = time.perf_counter()
    summary = finetune.main(finetune.parse_args(args))
    wall = time.perf_counter() - started
    return {"losses": summary["losses"], "train_seconds": summary["train_seconds"], "precision": precision,
            "steps_per_second": summary["steps_per_second"], "cache_fill_seconds": TimedCache.seconds,
            "setup_seconds": wall - summary["train_seconds"] - TimedCache.seconds,
            "cache_computed": summary["computed"], "resolution": summary["resolution"]}


def run_arm(options) -> None:
    """Entry of an arm's subprocess: train, then add this process's peak memory and write JSON."""
    arms = {"finetune": run_finetune_arm, "finetune_fp32": lambda o: run_finetune_arm(o, "no"),
            "baseline": run_baseline_arm}
    result = arms[options.arm](options)
    result["images_per_second"] = result["steps_per_second"] * options.batch_size
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result["torch_threads"] = torch.get_num_threads()
    if options.device.startswith("cuda"):
        result["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(options.arm_output).write_text(json.dumps(result, indent=2) + "\n")


def spawn_arm(arm: str, base: Path, data: Path, work: Path, steps: int, options) -> dict:
    output = work / f"{arm}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--base", str(base), "--data", str(data),
               "--work", str(work), "--steps", str(steps), "--batch_size", str(options.batch_size),
               "--rank", str(options.rank), "--seed", str(options.seed), "--device", options.device,
               "--arm_output", str(output)]
    environment = dict(os.environ)
    if options.device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""  # finetune.py's accelerator would otherwise take a GPU
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{arm} arm failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    result = json.loads(output.read_text())
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]  # before and after the arm
    return result


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="From-scratch bases (medaug init-model presets).")
    parser.add_argument("--steps", default="20,10", help="Timed steps, one number or one per preset.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of both arms.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Runs of each arm, alternating which goes first; medians are reported.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="Dataset folder (BUSI by default; a phantom dataset if absent).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="train_throughput.json", help="JSON file of the results.")
    # An arm's subprocess: not for users.
    for flag in ("--arm", "--base", "--work", "--arm_output"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.arm is None:
        presets = options.presets.split(",")
        steps = [int(part) for part in options.steps.split(",")]
        if len(steps) not in (1, len(presets)):
            parser.error(f"--steps: give one number or one per preset ({len(presets)}), got {options.steps}")
        options.steps = dict(zip(presets, steps * len(presets) if len(steps) == 1 else steps))
    else:
        options.steps = int(options.steps)
    return options


def training_prompts(data: Path) -> list[str]:
    import pandas as pd

    return sorted(pd.read_csv(data / "metadata.csv")["text"].dropna().astype(str).unique())


def summarise_runs(runs: list[dict]) -> dict:
    """Medians over an arm's repeats (peak memory: the largest), with every run kept beside them."""
    summary = {key: statistics.median(run[key] for run in runs)
               for key in ("images_per_second", "steps_per_second", "train_seconds", "setup_seconds",
                           "cache_fill_seconds")}
    summary["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs)
    summary["images_per_second_runs"] = [run["images_per_second"] for run in runs]
    summary["spread"] = [min(summary["images_per_second_runs"]), max(summary["images_per_second_runs"])]
    summary["late_loss"] = statistics.mean(statistics.mean(run["losses"][len(run["losses"]) // 2:]) for run in runs)
    for key in ("resolution", "torch_threads", "cache_computed", "trainable_parameters", "losses"):
        if key in runs[0]:
            summary[key] = runs[0][key]
    summary["runs"] = runs
    return summary


def compare_preset(preset: str, steps: int, data: Path, scratch: Path, options) -> dict:
    from medaug.models import init_model

    base = scratch / f"base-{preset}"
    description = init_model(base, preset=preset, prompts=training_prompts(data))
    runs = {arm: [] for arm in ARMS}
    for repeat in range(options.repeats):
        # Rotate which arm goes first, so a neighbour's job on a shared machine does not load one arm only.
        for arm in ARMS[repeat % len(ARMS):] + ARMS[:repeat % len(ARMS)]:
            work = scratch / f"{preset}-{arm}-{repeat}"  # a fresh cache each time: every fill is timed
            work.mkdir()
            runs[arm].append(spawn_arm(arm, base, data, work, steps, options))
    arms = {arm: summarise_runs(arm_runs) for arm, arm_runs in runs.items()}
    if arms["finetune"]["resolution"] != arms["baseline"]["resolution"]:
        raise RuntimeError(f"{preset}: the arms trained at different resolutions "
                           f"({arms['finetune']['resolution']} and {arms['baseline']['resolution']} px)")
    return {"resolution": arms["baseline"]["resolution"], "steps": steps, "batch_size": options.batch_size,
            "rank": options.rank, "repeats": options.repeats, "parameters": description["parameters"], **arms,
            "ratio_finetune_vs_baseline": arms["finetune"]["images_per_second"] / arms["baseline"]["images_per_second"],
            "ratio_finetune_fp32_vs_baseline": (arms["finetune_fp32"]["images_per_second"]
                                                / arms["baseline"]["images_per_second"])}


def print_table(results: dict) -> None:
    print(f"{'preset':7} {'px':>4} {'steps':>5} {'batch':>5} {'runs':>4} {'arm':>13} {'img/s (spread)':>20} "
          f"{'ratio':>6} {'late loss':>9} {'cache fill s':>12} {'RSS MiB':>8}")
    for preset, row in results["presets"].items():
        for arm in ARMS:
            summary = row[arm]
            ratio = summary["images_per_second"] / row["baseline"]["images_per_second"]
            print(f"{preset:7} {row['resolution']:4d} {row['steps']:5d} {row['batch_size']:5d} {row['repeats']:4d} "
                  f"{arm:>13} {summary['images_per_second']:8.2f} ({summary['spread'][0]:.2f}-"
                  f"{summary['spread'][1]:.2f}) {ratio:6.2f} {summary['late_loss']:9.4f} "
                  f"{summary['cache_fill_seconds']:12.2f} {summary['peak_rss_mib']:8.0f}")
    print("images/s are medians over runs; ratio against the baseline; late loss: mean loss over the last half of "
          "the steps, averaged over runs; each run:")
    for preset, row in results["presets"].items():
        for arm in ARMS:
            print(f"  {preset} {arm}: " + ", ".join(f"{value:.2f}" for value in row[arm]["images_per_second_runs"]))


def main(argv: list[str] | None = None) -> dict | None:
    options = parse_args(argv)
    if options.arm is not None:
        run_arm(options)
        return None
    from medaug.data import make_phantom_dataset

    results = {"date": time.strftime("%Y-%m-%d"), "device": options.device, "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "load_average_at_start": list(os.getloadavg()), "presets": {}}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        data = Path(options.data)
        if not (data / "metadata.csv").is_file():
            data = make_phantom_dataset(scratch / "phantom", num_images=200, size=128)
        results["data"] = str(data)
        for preset, steps in options.steps.items():
            results["presets"][preset] = compare_preset(preset, steps, data, scratch, options)
    results["load_average_at_end"] = list(os.getloadavg())
    results["ratio"] = {preset: row["ratio_finetune_vs_baseline"] for preset, row in results["presets"].items()}
    print_table(results)
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
