#!/usr/bin/env python
"""Images/s of `medaug generate`'s defaults against stock diffusers pipelines, and the quality check of its sampler.

    python benchmarks/generate_throughput.py --demo_dir outputs/demo [--presets small] [--images 16] \
        [--repeats 3] [--output generate_throughput.json]

Speed. For each preset (tiny at 64 px, small at 128 px) it makes a from-scratch base, a LoRA fine-tune
(finetune.py, 2 steps) and a ControlNet on mask boundaries (train_controlnet.py, 2 steps): the weights are barely
trained, which does not change the cost of sampling. On the same phantom masks and prompts, guidance scale 3:

- stock: `StableDiffusionPipeline` / `StableDiffusionControlNetPipeline.from_pretrained(base)` with
  `load_lora_weights(run)`, 20 DDIM steps, fp32, called once per image with a prompt (and a PIL edge map), PNG
  saved, as a user following the diffusers documentation would;
- medaug: `medaug.generate.generate(..., from_masks=...)` with its defaults (DPM-Solver++ at DEFAULT_STEPS, precision
  "auto", LoRA fused at load, batches of --batch_size, images, masks and manifest written).

Each arm runs --repeats times, alternating which goes first; the ratio is of median sampling throughput (images/s;
loading is timed apart), with every run's images/s kept and the spread (min-max over runs) printed.

Quality (needs a trained model: the output folder of `medaug demo`). The demo's mask-channel run generates the same
jobs (same masks, same per-image seeds, so the same starting noise) with 20 DDIM steps in fp32 (the stock sampler)
and with medaug's default sampler, and a converged reference (medaug's DPM-Solver++ from t=999, --reference_steps,
fp32). Reported:
- Fréchet distance in the demo's domain encoder's space to a large real phantom set (real images of the demo's own
  distribution), beside the real-vs-real floor (two disjoint real sets of the synthetic set's size) and the
  bootstrap standard deviation of the 20-step DDIM distance: equal quality means a difference within that noise;
- the mean absolute difference (grey levels, 0-255) of each sampler's images to the converged reference's: the
  error of the ODE solve itself, which needs no encoder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = {"tiny": 64, "small": 128}
PHANTOM_SIZE = 128  # medaug demo's phantom images: the real distribution of the quality check
STOCK_SCHEDULER = "ddim"


def load_script(name: str):
    return importlib.import_module(f"medaug.scripts.{name}")


def make_models(work: Path, preset: str, data: Path) -> tuple[Path, Path, Path]:
    """(base, LoRA folder, ControlNet folder) for `preset`, trained 2 steps each."""
    from medaug.data import DatasetFolder
    from medaug.models import init_model

    folder = DatasetFolder(data)
    base = work / f"base-{preset}"
    init_model(base, preset=preset, prompts=sorted({folder.value(i, "text") for i in range(len(folder))}))
    common = ["--train_data_dir", str(data), "--report_to", "none", "--max_train_steps", "2", "--train_batch_size",
              "2", "--latent_cache_dir", str(work / "cache"), "--resolution", str(RESOLUTION[preset])]
    finetune, controlnet = load_script("finetune"), load_script("train_controlnet")
    lora = work / f"lora-{preset}"
    finetune.main(finetune.parse_args(["--pretrained_model_name_or_path", str(base), "--output_dir", str(lora),
                                       "--train_mode", "lora", *common]))
    control = work / f"controlnet-{preset}"
    controlnet.main(controlnet.parse_args(["--lora_dir", str(lora), "--output_dir", str(control), "--edge_method",
                                           "mask_boundary", *common]))
    return base, lora, control


def medaug_arm(model_dir: Path, data: Path, output_dir: Path, images: int, options) -> dict:
    from medaug.generate import generate

    steps = {} if options.medaug_steps is None else {"num_inference_steps": options.medaug_steps}
    summary = generate(model_dir, output_dir, from_masks=data, num_per_source=1, max_sources=images,
                       guidance_scale=options.guidance_scale, batch_size=options.batch_size, **steps)
    return {key: summary[key] for key in ("load_seconds", "seconds", "images_per_second", "precision",
                                          "torch_threads")} | {"images": summary["written"]}


def load_stock_pipeline(base: Path, lora: Path, controlnet_dir: Path | None):
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionPipeline)

    if controlnet_dir is None:
        pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    else:
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(
            base, controlnet=ControlNetModel.from_pretrained(controlnet_dir / "controlnet"), safety_checker=None,
            requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.load_lora_weights(str(lora))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def stock_arm(base: Path, lora: Path, controlnet_dir: Path | None, data: Path, output_dir: Path, images: int,
              options, resolution: int) -> dict:
    """One pipeline call per image, as the diffusers documentation shows it."""
    from PIL import Image

    from medaug.data import DatasetFolder
    from medaug.edges import row_control_image

    loading = time.perf_counter()
    pipeline = load_stock_pipeline(base, lora, controlnet_dir)
    load_seconds = time.perf_counter() - loading
    folder = DatasetFolder(data)
    rows = folder.indices("train")[:images]
    # Edge maps are made before timing: medaug's arm also prepares its edges before sampling.
    controls = [Image.fromarray((row_control_image(folder, i, resolution, method="mask_boundary") * 255)
                                .astype("uint8")) for i in rows]
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for number, (row, control) in enumerate(zip(rows, controls)):
        extra = {} if controlnet_dir is None else {"image": control}
        image = pipeline(folder.value(row, "text"), num_inference_steps=options.stock_steps,
                         guidance_scale=options.guidance_scale,
                         height=resolution, width=resolution,
                         generator=torch.Generator().manual_seed(number), **extra).images[0]
        image.save(output_dir / f"{number:05d}.png")
    seconds = time.perf_counter() - started
    return {"images": len(rows), "load_seconds": load_seconds, "seconds": seconds,
            "images_per_second": len(rows) / seconds, "precision": "fp32", "torch_threads": torch.get_num_threads()}


def summarise(runs: list[dict]) -> dict:
    speeds = [run["images_per_second"] for run in runs]
    return {"images_per_second": statistics.median(speeds), "images_per_second_runs": speeds,
            "spread": [min(speeds), max(speeds)], "precision": runs[0]["precision"],
            "torch_threads": runs[0]["torch_threads"], "runs": runs}


def compare_case(work: Path, preset: str, label: str, models: tuple[Path, Path, Path], data: Path, options) -> dict:
    base, lora, control = models
    runs = {"medaug": [], "stock": []}
    for repeat in range(options.repeats):
        for arm in ("medaug", "stock") if repeat % 2 == 0 else ("stock", "medaug"):
            output = work / f"{arm}-{preset}-{label}-{repeat}"
            if arm == "medaug":
                runs[arm].append(medaug_arm(control if label == "controlnet" else lora, data, output, options.images,
                                            options))
            else:
                runs[arm].append(stock_arm(base, lora, control if label == "controlnet" else None, data, output,
                                           options.images, options, RESOLUTION[preset]))
    arms = {arm: summarise(arm_runs) for arm, arm_runs in runs.items()}
    return {"resolution": RESOLUTION[preset], **arms,
            "ratio": arms["medaug"]["images_per_second"] / arms["stock"]["images_per_second"],
            "ratio_runs": [m["images_per_second"] / s["images_per_second"] for m, s in zip(runs["medaug"],
                                                                                           runs["stock"])]}


# ---------------------------------------------------------------------------------------------------------
# Quality of the default sampler on a trained model
# ---------------------------------------------------------------------------------------------------------

def sampler_images(model_dir: Path, data: Path, output_dir: Path, scheduler: str, steps: int, precision: str,
                   num_per_source: int, guidance: float) -> tuple[Path, dict]:
    from medaug.generate import generate

    summary = generate(model_dir, output_dir, from_masks=data, num_per_source=num_per_source, scheduler=scheduler,
                       num_inference_steps=steps, precision=precision, guidance_scale=guidance, batch_size=8)
    return output_dir, summary


def grey_images(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(path).convert("L"), dtype=np.float64)
                     for path in sorted((folder / "images").glob("*.png"))])


def bootstrap_std(real: np.ndarray, synthetic: np.ndarray, rounds: int, seed: int) -> float:
    from medaug.metrics.distances import frechet_distance

    rng = np.random.default_rng(seed)
    values = [frechet_distance(real, synthetic[rng.integers(0, len(synthetic), len(synthetic))])
              for _ in range(rounds)]
    return float(np.std(values))


def sampler_quality(demo_dir: Path, work: Path, options) -> dict:
    """Fréchet distance (demo encoder) and distance to a converged solve, stock sampler vs medaug's default."""
    from medaug.data import make_phantom_dataset
    from medaug.metrics.distances import frechet_distance
    from medaug.metrics.features import encoder_extractor, extract_features
    from medaug.metrics.imagesets import open_image_set
    from medaug.speed import DEFAULT_SCHEDULER, DEFAULT_STEPS

    model, data = demo_dir / "finetune", demo_dir / "data"
    extractor = encoder_extractor(demo_dir / "encoder")
    steps = options.medaug_steps or DEFAULT_STEPS
    configs = {f"stock sampler (ddim {options.stock_steps}, fp32)": (STOCK_SCHEDULER, options.stock_steps, "fp32"),
               f"medaug default ({DEFAULT_SCHEDULER} {steps}, auto)": (DEFAULT_SCHEDULER, steps, "auto"),
               f"{DEFAULT_SCHEDULER} {steps}, fp32": (DEFAULT_SCHEDULER, steps, "fp32"),
               f"ddim {steps}, fp32": ("ddim", steps, "fp32"),
               f"reference ({DEFAULT_SCHEDULER} {options.reference_steps}, fp32)":
                   (DEFAULT_SCHEDULER, options.reference_steps, "fp32")}
    folders, results = {}, {}
    for number, (name, (scheduler, steps, precision)) in enumerate(configs.items()):
        folders[name], summary = sampler_images(model, data, work / f"quality-{number}", scheduler, steps, precision,
                                                options.quality_per_source, options.guidance_scale)
        results[name] = {"scheduler": scheduler, "steps": steps, "precision": summary["precision"],
                         "images": summary["written"], "images_per_second": summary["images_per_second"]}
    count = results[next(iter(results))]["images"]
    real_dir = make_phantom_dataset(work / "real", num_images=options.real_images, size=PHANTOM_SIZE, seed=12345)
    real = extract_features(extractor, open_image_set(real_dir, None, "--real"))
    floor_sets = [extract_features(extractor, open_image_set(real_dir, None, "--real", max_images=count, seed=seed))
                  for seed in (1, 2)]
    reference = grey_images(folders[list(configs)[-1]])
    for name, folder in folders.items():
        features = extract_features(extractor, open_image_set(folder, None, "--synthetic"))
        results[name]["frechet_distance"] = frechet_distance(real, features)
        results[name]["grey_levels_from_reference"] = float(np.abs(grey_images(folder) - reference).mean())
        if name == list(configs)[0]:
            results[name]["frechet_bootstrap_std"] = bootstrap_std(real, features, 50, options.seed)
    stock, default = results[list(configs)[0]], results[list(configs)[1]]
    difference = default["frechet_distance"] - stock["frechet_distance"]
    return {"model": str(model), "encoder": str(demo_dir / "encoder"), "synthetic_images": count,
            "real_images": len(real), "real_vs_real_floor": frechet_distance(*floor_sets), "samplers": results,
            "frechet_difference_default_minus_stock": difference,
            "equal_quality": bool(abs(difference) <= 2 * stock["frechet_bootstrap_std"]
                                  or default["frechet_distance"] <= stock["frechet_distance"])}


# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--images", type=int, default=16, help="Images per arm and run (phantom training masks).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each arm, alternating which goes first.")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="Both arms (guidance doubles the batch).")
    parser.add_argument("--stock_steps", type=int, default=20, help="DDIM steps of the stock arm.")
    parser.add_argument("--medaug_steps", type=int, default=None,
                        help="Steps of medaug's arm (default: medaug generate's default).")
    parser.add_argument("--batch_size", type=int, default=8, help="medaug's batch size.")
    parser.add_argument("--demo_dir", type=Path, default=None,
                        help="Output folder of `medaug demo` (its finetune run, data and encoder): the trained "
                             "model of the quality check. Without it the quality check is skipped, saying so.")
    parser.add_argument("--quality_per_source", type=int, default=2, help="Images per demo training mask.")
    parser.add_argument("--reference_steps", type=int, default=100, help="Steps of the converged reference solve.")
    parser.add_argument("--real_images", type=int, default=300, help="Real phantom images of the quality check.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="generate_throughput.json")
    return parser.parse_args(argv)


def print_results(results: dict) -> None:
    print(f"{'case':22} {'medaug img/s (spread)':>24} {'stock img/s (spread)':>24} {'ratio':>6}  per-run ratios")
    for case, row in results["cases"].items():
        medaug, stock = row["medaug"], row["stock"]
        print(f"{case:22} {medaug['images_per_second']:8.2f} ({medaug['spread'][0]:.2f}-{medaug['spread'][1]:.2f})"
              f"{'':>4} {stock['images_per_second']:8.2f} ({stock['spread'][0]:.2f}-{stock['spread'][1]:.2f})"
              f"{'':>4} {row['ratio']:6.2f}  " + ", ".join(f"{ratio:.2f}" for ratio in row["ratio_runs"]))
    quality = results.get("quality")
    if quality is None:
        print("quality: skipped (no --demo_dir)")
        return
    print(f"quality on {quality['model']}: {quality['synthetic_images']} images per sampler, "
          f"{quality['real_images']} real; real-vs-real floor {quality['real_vs_real_floor']:.2f}")
    for name, row in quality["samplers"].items():
        extra = f" (bootstrap std {row['frechet_bootstrap_std']:.2f})" if "frechet_bootstrap_std" in row else ""
        print(f"  {name:36} FD {row['frechet_distance']:7.2f}{extra:26} |image - reference| "
              f"{row['grey_levels_from_reference']:5.2f} grey levels, {row['images_per_second']:.2f} img/s")
    print(f"  default - stock FD {quality['frechet_difference_default_minus_stock']:+.2f}: "
          f"{'equal or better quality' if quality['equal_quality'] else 'WORSE quality'}")


def main(argv: list[str] | None = None) -> dict:
    options = parse_args(argv)
    from medaug.data import make_phantom_dataset

    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average_at_start": list(os.getloadavg()),
               "stock": f"{STOCK_SCHEDULER} {options.stock_steps} steps, fp32, one image per call",
               "guidance_scale": options.guidance_scale, "batch_size": options.batch_size,
               "images": options.images, "repeats": options.repeats, "cases": {}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = make_phantom_dataset(work / "phantom", num_images=max(8, options.images * 2), size=128, seed=0)
        for preset in options.presets.split(","):
            models = make_models(work, preset, data)
            for label in ("no_controlnet", "controlnet"):
                results["cases"][f"{preset}_{label}"] = compare_case(work, preset, label, models, data, options)
        if options.demo_dir is not None:
            results["quality"] = sampler_quality(options.demo_dir, work, options)
    results["ratio"] = {case: row["ratio"] for case, row in results["cases"].items()}
    results["load_average_at_end"] = list(os.getloadavg())
    print_results(results)
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
