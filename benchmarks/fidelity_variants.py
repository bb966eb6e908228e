#!/usr/bin/env python
"""Label fidelity against training steps for the ways medaug can make a diffusion model follow a mask.

On a stratified fraction of a dataset's training rows (BUSI 25% by default; val and test rows kept), with a
`small` base whose VAE is trained first, each variant trains in increments and, at each checkpoint, generates one
image per training mask and scores them with one fidelity segmenter trained on the same subset
(`medaug.metrics.fidelity`). The generator sees only the subset. Variants:

- `controlnet_boundary`: the demo's path before this benchmark: a full text fine-tune (600 steps), then a ControlNet
  on mask boundaries;
- `controlnet_filled`: the same ControlNet on the filled mask;
- `mask_channels`: the UNet itself reads the mask as an extra input channel (`finetune.py --mask_channels`),
  trained from the base in full (no ControlNet);
- `mask_channels_lr1e-3`: the same at a higher learning rate;
- `mask_channels_consistency`: `mask_channels` plus the mask-consistency loss (`--consistency_segmenter`), with a
  segmenter of another seed than the one that scores;
- `pix2pix`: no diffusion at all (train_pix2pix.py, U-Net + PatchGAN, L1 x 100), the floor to beat.

    python benchmarks/fidelity_variants.py --work /tmp/medaug-fidelity
    python benchmarks/fidelity_variants.py --variants mask_channels --checkpoints 250,500 --smoke   # seconds

It prints a table and writes `fidelity_curves.json`, `fidelity_curves.md` and `fidelity_curves.png` under --work;
rerunning continues from what is there (training resumes from its checkpoints, measured points are kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from medaug.lowdata.generators import prepare_base, text_finetune
from medaug.training.run_scripts import rerun_flags, run_script

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("controlnet_boundary", "controlnet_filled", "mask_channels", "mask_channels_lr1e-3",
            "mask_channels_consistency", "pix2pix")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "busi",
                        help="Dataset folder with train/val/test splits and masks.")
    parser.add_argument("--fraction", type=float, default=0.25, help="Stratified fraction of the training rows.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medaug-fidelity"), help="Where everything is written.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--checkpoints", default="250,500,1000,1500",
                        help="Generator training steps at which fidelity is measured (ControlNet steps for the "
                             "ControlNet variants, after their 600-step text fine-tune).")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vae_steps", type=int, default=150)
    parser.add_argument("--text_steps", type=int, default=600, help="The ControlNet variants' text fine-tune.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--segmenter_epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="A tiny base, phantom data and a few steps: exercises the code, measures nothing.")
    return parser.parse_args(input_args)


# ---- shared stages -----------------------------------------------------------------------------------------


def prepare_data(args) -> Path:
    from medaug.data import make_phantom_dataset
    from medaug.data.subset import write_subset

    data = args.work / "data"
    if (data / "metadata.csv").is_file():
        return data
    if args.smoke:
        return make_phantom_dataset(data, num_images=40, size=64, seed=args.seed)
    return write_subset(args.source, data, args.fraction, seed=args.seed)


def generator_settings(args):
    from medaug.lowdata.generators import GeneratorSettings

    return GeneratorSettings(resolution=args.resolution, preset="tiny" if args.smoke else "small",
                             vae_steps=args.vae_steps, base_steps=args.text_steps, batch_size=args.batch_size,
                             segmenter_epochs=args.segmenter_epochs, inference_steps=args.inference_steps,
                             guidance_scale=args.guidance_scale, seed=args.seed)


def prepare_segmenter(args, data: Path, seed: int, name: str = "segmenter"):
    from medaug.metrics.fidelity import FidelitySegmenter, train_fidelity_segmenter

    folder = args.work / name
    if (folder / "fidelity_segmenter.json").is_file():
        return FidelitySegmenter.load(folder)
    segmenter = train_fidelity_segmenter(data, args.resolution, args.segmenter_epochs, seed)
    segmenter.save(folder)
    return segmenter


# ---- variants: each trains its generator to `steps` and returns its run folder --------------------------------


def common(args, data: Path, output_dir: Path, steps: int) -> list:
    from medaug.lowdata.generators import training_flags

    return training_flags(generator_settings(args), data, output_dir, steps, args.work / "cache")


def train_variant(args, variant: str, data: Path, base: Path, steps: int) -> Path:
    output_dir = args.work / variant
    if variant == "pix2pix":
        run_script("train_pix2pix", ["--train_data_dir", data, "--resolution", args.resolution, "--seed", args.seed,
                                     "--output_dir", output_dir, "--max_train_steps", steps, "--train_batch_size",
                                     args.batch_size, "--checkpointing_steps", min(250, steps),
                                     "--checkpoints_total_limit", 1, "--random_flip", *rerun_flags(output_dir)])
    elif variant.startswith("controlnet"):
        tuned = text_finetune(args.work, base, data, generator_settings(args))
        method = "mask_boundary" if variant == "controlnet_boundary" else "mask_filled"
        run_script("train_controlnet", ["--lora_dir", tuned, *common(args, data, output_dir, steps),
                                        "--edge_method", method, "--controlnet_train_mode", "full",
                                        "--learning_rate", 3e-4])
    else:
        rate = 1e-3 if variant.endswith("lr1e-3") else 3e-4
        consistency = []
        if variant.endswith("consistency"):  # a segmenter of another seed than the scoring one
            prepare_segmenter(args, data, args.seed + 1, "segmenter-consistency")
            consistency = ["--consistency_segmenter", args.work / "segmenter-consistency"]
        run_script("finetune", ["--pretrained_model_name_or_path", base, *common(args, data, output_dir, steps),
                                "--conditioning", "text", "--train_mode", "full", "--mask_channels",
                                "--learning_rate", rate, *consistency])
    return output_dir


def train_seconds(args, variant: str, run_dir: Path) -> float:
    """Generator training time from the runs' loss histories (the text fine-tune counted for ControlNets)."""
    from medaug.training.loss_log import LOSS_HISTORY, read_loss_history

    runs = [run_dir] + ([args.work / "text_finetune"] if variant.startswith("controlnet") else [])
    return sum((read_loss_history(run / LOSS_HISTORY) or [{"seconds": 0.0}])[-1]["seconds"] for run in runs)


def measure(args, variant: str, run_dir: Path, steps: int, data: Path, segmenter) -> dict:
    import shutil

    from medaug.generate import generate
    from medaug.metrics.fidelity import label_fidelity

    synthetic = args.work / "synthetic" / f"{variant}-{steps}"
    shutil.rmtree(synthetic, ignore_errors=True)
    started = time.perf_counter()
    generate(run_dir, synthetic, from_masks=data, split="train", num_per_source=1,
             num_inference_steps=args.inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
             batch_size=8)
    generation = time.perf_counter() - started
    fidelity = label_fidelity(segmenter, synthetic)
    return {"variant": variant, "steps": steps, "train_seconds": round(train_seconds(args, variant, run_dir), 1),
            "generate_seconds": round(generation, 1), **{key: fidelity[key] for key in (
                "ratio", "synthetic_dice", "real_dice", "share_above_0_5", "pairs")}}


# ---- report -----------------------------------------------------------------------------------------------


def write_results(args, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = {"machine": f"{platform.machine()} {platform.processor() or ''} CPU".strip(), "settings": {
        key: str(value) for key, value in vars(args).items()}, "points": points}
    (args.work / "fidelity_curves.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| variant | generator steps | training s | fidelity ratio | synthetic Dice | real Dice | pairs > 0.5 | pairs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {p['variant']} | {p['steps']} | {p['train_seconds']:.0f} | **{p['ratio']:.2f}** | "
              f"{p['synthetic_dice']:.3f} | {p['real_dice']:.3f} | {p['share_above_0_5']:.0%} | {p['pairs']} |"
              for p in points]
    (args.work / "fidelity_curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for variant in dict.fromkeys(p["variant"] for p in points):
        mine = [p for p in points if p["variant"] == variant]
        axis.plot([p["train_seconds"] / 60 for p in mine], [p["ratio"] for p in mine], marker="o", label=variant)
    axis.axhline(0.8, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("generator training, minutes (2-core CPU)")
    axis.set_ylabel("label fidelity ratio")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.work / "fidelity_curves.png")
    plt.close(figure)


def main(args) -> list[dict]:
    args.work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.resolution, args.vae_steps, args.text_steps, args.segmenter_epochs = 64, 2, 2, 2
        args.inference_steps = 2
    data = prepare_data(args)
    base = prepare_base(args.work, data, generator_settings(args))
    segmenter = prepare_segmenter(args, data, args.seed)
    print(f"fidelity segmenter: real test Dice {segmenter.info.real_dice:.3f} on {segmenter.info.real_pairs} lesion "
          "images", flush=True)
    results_path = args.work / "fidelity_curves.json"
    points = json.loads(results_path.read_text())["points"] if results_path.is_file() else []
    done = {(p["variant"], p["steps"]) for p in points}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant '{variant}'; expected some of {', '.join(VARIANTS)}")
        for steps in sorted(int(step) for step in args.checkpoints.split(",")):
            if (variant, steps) in done:
                continue
            run_dir = train_variant(args, variant, data, base, steps)
            points.append(measure(args, variant, run_dir, steps, data, segmenter))
            print(json.dumps(points[-1]), flush=True)
            write_results(args, points)
    return points


if __name__ == "__main__":
    main(parse_args())
