"""The study's real-only arm against a plain training loop, on one BUSI subset: is the yardstick worth beating?

Draws the stratified subset `medaug study seg` draws (`--fraction`, `--subset_seed`), then trains, per seed, each
`--variants` entry for the same optimiser steps and scores it on the whole real test split (lesion-image Dice, the
issue's number, and Dice over every test image):

- `plain`: the reference, a loop written here on its own: stretch to the square, left-right flips, one sigmoid
  channel with MONAI's DiceCELoss, constant Adam, last weights, no validation;
- `engine`: `medaug.segmentation.train_seg.fit_segmenter` with its defaults (what every study arm uses);
- `old`: the engine as it was before (pad, no augmentation, cosine schedule, best of 20 validations);
- `old+X`: the old recipe with one change X of stretch / flips / constant / last, to see what each buys;
- `engine+X`: the defaults with one change X (cosine, best_val, pad, no_flips, lesion_dice, ema, or a step count such
  as 750); changes combine (`engine+cosine+lesion_dice`).

It prints a table of mean, std and per-seed values with the wall time of each variant, the ratio of each mean to
`plain`'s, and writes everything to --record (JSON) after every variant; run again with the same --record, it keeps
the variants recorded there and trains only the others. Timings assume a quiet machine: say when it was not.

    python benchmarks/seg_yardstick.py --resolution 64 --seeds 3 --record benchmarks/measured/seg_yardstick_64.json
    python benchmarks/seg_yardstick.py --variants plain,engine --resolution 128 --seeds 3
    python benchmarks/seg_yardstick.py --smoke      # seconds, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OLD = {"fit": "pad", "augment": "none", "schedule": "cosine", "select": "best_val"}
CHANGES = {"stretch": {"fit": "stretch"}, "flips": {"augment": "light"}, "constant": {"schedule": "constant"},
           "last": {"select": "last"}, "cosine": {"schedule": "cosine"}, "best_val": {"select": "best_val"},
           "pad": {"fit": "pad"}, "no_flips": {"augment": "none"}, "lesion_dice": {"loss": "lesion_dice_ce"},
           "ema": {"ema": 0.99}}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "busi")
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/medaug-benchmarks/seg-yardstick"))
    parser.add_argument("--fraction", type=float, default=0.25, help="Share of the train split (1 for all).")
    parser.add_argument("--subset_seed", type=int, default=0)
    parser.add_argument("--variants", default="plain,engine,old,old+stretch,old+flips,old+constant,old+last")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=None, help="Torch CPU threads (default: all cores).")
    parser.add_argument("--record", type=Path, default=None, help="JSON to write (default OUTPUT_DIR/record.json).")
    parser.add_argument("--smoke", action="store_true", help="A phantom dataset, 4 steps at 32 px: checks the script.")
    return parser.parse_args(input_args)


def plain_loop(train: list[dict], test: list[dict], resolution: int, steps: int, batch_size: int, seed: int) -> list:
    """The reference: per-image Dice of a plain sigmoid loop (see the module docstring) on `test`."""
    import torch
    from monai.losses import DiceCELoss

    from medaug.segmentation.common import cached_dataset, evaluation_batches, make_loader, seed_everything
    from medaug.segmentation.metrics import segmentation_scores
    from medaug.segmentation.networks import build_network

    generator = seed_everything(seed)
    loader = make_loader(cached_dataset(train, resolution, 1, "stretch", True, "light", seed), batch_size, True,
                         generator)
    model = build_network("seg", "unet", 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_function = DiceCELoss(sigmoid=True)
    model.train()
    taken = 0
    while taken < steps:
        for batch in loader:
            if taken == steps:
                break
            optimizer.zero_grad()
            loss_function(model(batch["image"]), batch["mask"]).backward()
            optimizer.step()
            taken += 1
    model.eval()
    scores = {"dice": [], "has_lesion": []}
    with torch.no_grad():
        for batch in evaluation_batches(test, resolution, 1, "stretch", True, batch_size):
            target = (batch["mask"] > 0.5).long()
            scores["dice"] += segmentation_scores((model(batch["image"]) > 0).long(), target)["dice"]
            scores["has_lesion"] += [bool(m.any()) for m in target]
    return scores


def engine_run(variant: str, train, val, test, recipe, seed: int) -> dict:
    from medaug.segmentation.train_seg import fit_segmenter, score_segmenter

    base, *changes = variant.split("+")
    options = {"augment": "light"} if base == "engine" else dict(OLD)
    for change in changes:
        options.update({"steps": int(change)} if change.isdigit() else CHANGES[change])
    augment = options.pop("augment")
    recipe = replace(recipe, **options)
    model, history = fit_segmenter(train, val, recipe, seed, augment)
    scores = score_segmenter(model, test, recipe, "cpu")
    return {"scores": scores, "history": history}


def lesion_dice(scores: dict) -> float:
    values = [d for d, lesion in zip(scores["dice"], scores["has_lesion"]) if lesion]
    return sum(values) / len(values)


def subset_items(args):
    from medaug.lowdata.subsets import write_nested_subsets
    from medaug.segmentation.inputs import load_study_data

    subset = write_nested_subsets(args.data, args.output_dir / f"subset-{args.subset_seed}", [args.fraction],
                                  args.subset_seed)[args.fraction]
    return load_study_data("seg", subset)


def main(args) -> dict:
    import torch

    from medaug.segmentation.train_seg import SegRecipe

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.smoke:
        from medaug.data.phantom import make_phantom_dataset

        args.data = args.output_dir / "phantom"
        if not (args.data / "metadata.csv").is_file():
            make_phantom_dataset(args.data, num_images=24, size=48, seed=0)
        args.resolution, args.steps, args.seeds = 32, 4, 1
    data = subset_items(args)
    recipe = SegRecipe(steps=args.steps, resolution=args.resolution, batch_size=args.batch_size)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    path = args.record or args.output_dir / "record.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for variant in [v for v in variants if v not in rows]:
        started, runs = time.perf_counter(), []
        for seed in range(args.seeds):
            if variant == "plain":
                run = {"scores": plain_loop(data.train, data.test, args.resolution, args.steps, args.batch_size,
                                            seed)}
            else:
                run = engine_run(variant, data.train, data.val, data.test, recipe, seed)
            run["dice_lesion"] = lesion_dice(run["scores"])
            run["dice"] = statistics.fmean(run["scores"]["dice"])
            runs.append(run)
            print(f"{variant} seed {seed}: lesion Dice {run['dice_lesion']:.3f}", flush=True)
        values = [run["dice_lesion"] for run in runs]
        rows[variant] = {"dice_lesion": values, "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "dice_all": [run["dice"] for run in runs],
                         "seconds_per_run": (time.perf_counter() - started) / len(runs),
                         "history": [run.get("history") for run in runs]}
        write_record(path, args, data, recipe, rows)
    reference = rows.get("plain", {}).get("mean")
    print(f"\nBUSI {args.fraction:g} (subset seed {args.subset_seed}, {len(data.train)} train / {len(data.val)} val / "
          f"{len(data.test)} test), {args.resolution} px, {args.steps} steps, batch {args.batch_size}")
    print(f"{'variant':<14} {'lesion Dice':>11} {'std':>6} {'÷ plain':>8} {'s/run':>7}  per seed")
    for variant, row in rows.items():
        ratio = f"{row['mean'] / reference:.3f}" if reference else "-"
        print(f"{variant:<14} {row['mean']:>11.3f} {row['std']:>6.3f} {ratio:>8} {row['seconds_per_run']:>7.0f}  "
              + ", ".join(f"{v:.3f}" for v in row["dice_lesion"]))
    return write_record(path, args, data, recipe, rows)


def write_record(path: Path, args, data, recipe, rows: dict) -> dict:
    import torch

    record = {"benchmark": "seg yardstick", "date": date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{torch.get_num_threads()} torch threads",
              "command": "python benchmarks/seg_yardstick.py " + " ".join(
                  f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items()
                  if v not in (None, False) and k not in ("data", "output_dir", "record")),
              "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
              "recipe": recipe.settings(), "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"written {path}", flush=True)
    return record


if __name__ == "__main__":
    main(parse_args())
