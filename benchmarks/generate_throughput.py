#!/usr/bin/env python
"""Images/s of `medaug generate` against stock diffusers pipelines called one image at a time.

    python benchmarks/generate_throughput.py [--presets tiny,small] [--images 16] [--steps 20] \
        [--output generate_throughput.json]

For each preset (tiny at 64 px, small at 128 px) it makes a from-scratch base, a LoRA fine-tune (finetune.py,
2 steps) and a ControlNet on mask boundaries (train_controlnet.py, 2 steps): the weights are barely trained,
which does not change the cost of sampling. Then, on the same phantom masks and prompts, with the same number
of DDIM steps and the same guidance scale:

- medaug: `medaug.generate.generate(..., from_masks=...)` (LoRA fused at load, batches of --batch_size, images
  and masks written as PNG with the manifest);
- stock: `StableDiffusionPipeline` / `StableDiffusionControlNetPipeline.from_pretrained(base)` with
  `load_lora_weights(model_dir)`, called once per image with a prompt (and a PIL edge map), PNG saved, the
  other settings left at their defaults, as a user following the diffusers docs would.

Both arms run with and without the ControlNet. Model loading is timed apart from sampling; the ratio is of
sampling throughput (images/s), which is what grows with the number of images.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = {"tiny": 64, "small": 128}


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


def medaug_arm(model_dir: Path, data: Path, output_dir: Path, images: int, steps: int, guidance: float,
               batch_size: int) -> dict:
    from medaug.generate import generate

    summary = generate(model_dir, output_dir, from_masks=data, num_per_source=1, max_sources=images,
                       num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size)
    return {"images": summary["written"], "load_seconds": summary["load_seconds"], "seconds": summary["seconds"],
            "images_per_second": summary["images_per_second"]}


def stock_arm(base: Path, lora: Path, controlnet_dir: Path | None, data: Path, output_dir: Path, images: int,
              steps: int, guidance: float, resolution: int) -> dict:
    """One pipeline call per image, as the diffusers documentation shows it."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image

    from medaug.data import DatasetFolder
    from medaug.edges import row_control_image

    loading = time.perf_counter()
    if controlnet_dir is None:
        pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    else:
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(
            base, controlnet=ControlNetModel.from_pretrained(controlnet_dir / "controlnet"), safety_checker=None,
            requires_safety_checker=False)
    pipeline.load_lora_weights(str(lora))
    pipeline.set_progress_bar_config(disable=True)
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
        image = pipeline(folder.value(row, "text"), num_inference_steps=steps, guidance_scale=guidance,
                         height=resolution, width=resolution,
                         generator=torch.Generator().manual_seed(number), **extra).images[0]
        image.save(output_dir / f"{number:05d}.png")
    seconds = time.perf_counter() - started
    return {"images": len(rows), "load_seconds": load_seconds, "seconds": seconds,
            "images_per_second": len(rows) / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--images", type=int, default=16, help="Images per arm (phantom training masks).")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps, both arms.")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="Both arms (guidance doubles the batch).")
    parser.add_argument("--batch_size", type=int, default=8, help="medaug's batch size.")
    parser.add_argument("--output", default="generate_throughput.json")
    options = parser.parse_args(argv)
    from medaug.data import make_phantom_dataset

    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": options.steps,
               "guidance_scale": options.guidance_scale, "batch_size": options.batch_size, "presets": {}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = make_phantom_dataset(work / "phantom", num_images=max(8, options.images * 2), size=128, seed=0)
        for preset in options.presets.split(","):
            base, lora, control = make_models(work, preset, data)
            arms = {}
            for label, model_dir in (("no_controlnet", lora), ("controlnet", control)):
                kwargs = dict(images=options.images, steps=options.steps, guidance=options.guidance_scale)
                medaug = medaug_arm(model_dir, data, work / f"medaug-{preset}-{label}",
                                    batch_size=options.batch_size, **kwargs)
                stock = stock_arm(base, lora, control if label == "controlnet" else None, data,
                                  work / f"stock-{preset}-{label}", resolution=RESOLUTION[preset], **kwargs)
                arms[label] = {"medaug": medaug, "stock": stock,
                               "ratio": medaug["images_per_second"] / stock["images_per_second"]}
            results["presets"][preset] = {"resolution": RESOLUTION[preset], **arms}
    print(f"{'preset':7} {'controlnet':>10} {'medaug img/s':>13} {'stock img/s':>12} {'ratio':>6}")
    for preset, arms in results["presets"].items():
        for label in ("no_controlnet", "controlnet"):
            arm = arms[label]
            print(f"{preset:7} {label == 'controlnet'!s:>10} {arm['medaug']['images_per_second']:13.2f} "
                  f"{arm['stock']['images_per_second']:12.2f} {arm['ratio']:6.2f}")
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
