"""The floor a generator is judged against: BUSI train vs BUSI test, both real, in the domain encoder's space.

Two real samples of one distribution are not at distance zero: a finite test split (156 images) differs from
the training split by sampling alone. Synthetic images can only be judged against that floor, measured
with the same encoder, the same preprocessing and the same set sizes.

    python benchmarks/real_vs_real_floor.py [--data ../shared/datasets/busi] [--output_dir outputs/floor]
        [--max_train_steps 1000] [--resolution 96]

Runs `medaug train-encoder` on the train split, then `medaug evaluate --real DATA --real_split train
--synthetic DATA --synthetic_split test --encoder_dir ...`, prints a table and writes OUT/floor.json.
Generators must be evaluated with the encoder this writes (OUT/encoder) for their numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "busi")
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "outputs" / "floor")
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_training", action="store_true", help="Reuse OUT/encoder from an earlier run.")
    return parser.parse_args(input_args)


def medaug(*arguments) -> float:
    """Run a medaug subcommand with this interpreter; return its wall time in seconds."""
    command = [sys.executable, "-m", "medaug.cli", *[str(a) for a in arguments]]
    print("$ medaug " + " ".join(str(a) for a in arguments), flush=True)
    started = time.time()
    subprocess.run(command, check=True)
    return time.time() - started


def main(args: argparse.Namespace) -> dict:
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"error: --data {args.data} has no metadata.csv (the BUSI folder of ../shared/datasets)")
    encoder_dir, evaluate_dir = args.output_dir / "encoder", args.output_dir / "evaluate"
    times = {}
    if not args.skip_training:
        times["train_encoder_s"] = medaug(
            "train-encoder", args.data, "--output_dir", encoder_dir, "--split", "train",
            "--max_train_steps", args.max_train_steps, "--train_batch_size", args.train_batch_size,
            "--resolution", args.resolution, "--seed", args.seed, "--device", "cpu", "--overwrite")
    times["evaluate_s"] = medaug(
        "evaluate", "--real", args.data, "--real_split", "train", "--synthetic", args.data,
        "--synthetic_split", "test", "--encoder_dir", encoder_dir, "--output_dir", evaluate_dir,
        "--seed", args.seed, "--device", "cpu", "--save_features")
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    floor = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, no GPU used",
        "data": str(args.data),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "output_dir")},
        "features": {k: metrics["features"][k] for k in ("extractor", "preprocessing", "dimensions")},
        "real": metrics["real"],
        "test": metrics["synthetic"],
        "overall": metrics["features"]["metrics"],
        "per_label": metrics["features"]["per_label"],
        "ms_ssim": {name: metrics["diversity"][name]["ms_ssim_mean"] for name in ("real", "synthetic")},
        "near_copies_test_vs_train": metrics["memorisation"]["flagged_count"],
        "times": {k: round(v, 1) for k, v in times.items()},
    }
    (args.output_dir / "floor.json").write_text(json.dumps(floor, indent=2), encoding="utf-8")
    print_table(floor)
    return floor


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def print_table(floor: dict) -> None:
    overall = floor["overall"]
    print(f"\nreal-vs-real floor, {floor['features']['extractor']} features ({floor['features']['preprocessing']})")
    print(f"{'set':<10}{'train':>7}{'test':>6}{'Fréchet':>10}{'KID mean':>12}{'KID std':>10}{'prec':>7}{'recall':>7}")
    rows = [("all", overall)] + [(k, v) for k, v in floor["per_label"].items() if "frechet_distance" in v]
    for name, m in rows:
        print(f"{name:<10}{m['real_images']:>7}{m['synthetic_images']:>6}{m['frechet_distance']:>10.4f}"
              f"{m['kid_mean']:>12.3e}{m['kid_std']:>10.1e}{m['precision']:>7.3f}{m['recall']:>7.3f}")
    print(f"times: {floor['times']}; written to floor.json")


if __name__ == "__main__":
    main(parse_args())
