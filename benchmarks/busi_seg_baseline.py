"""Real-only segmentation baseline on BUSI: the number every synthetic-data arm has to beat.

Runs `medaug bench seg --arms real` on ../shared/datasets/busi at 128 px over 3 seeds, sized to finish in
under 20 minutes on a 2-core CPU, and prints the test Dice (mean ± 95% CI over seeds) and the wall time,
the line recorded in benchmarks/RESULTS.md. Outputs go to --output_dir (outside the repository by default);
running it again on the same folder reuses finished seeds, so delete the folder for a fresh timing.

    python benchmarks/busi_seg_baseline.py
    python benchmarks/busi_seg_baseline.py --epochs 40 --num_threads 2   # a less busy or bigger machine
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "busi",
                        help="BUSI dataset folder (metadata.csv with train/val/test splits and masks).")
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/medaug-benchmarks/busi-seg-baseline"))
    parser.add_argument("--network", default="unet")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=1,
                        help="Torch CPU threads; 1 is faster than 2 on a 2-core machine others also use.")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(input_args)


def main(args) -> dict:
    from medaug.segmentation.study import run_study

    if not (args.data / "metadata.csv").is_file():
        raise SystemExit(f"--data: no BUSI dataset at {args.data}")
    started = time.perf_counter()
    summary = run_study(
        "seg", args.data, args.output_dir, network=args.network, resolution=args.resolution, epochs=args.epochs,
        batch_size=args.batch_size, seeds=args.seeds, arms=["real"], device=args.device,
        num_threads=args.num_threads,
        on_progress=lambda done, total, text: print(f"[{time.perf_counter() - started:6.0f} s] {text}", flush=True),
    )
    wall = time.perf_counter() - started
    dice = summary["groups"][0]["metrics"]["dice"]
    lesion = summary["groups"][0]["metrics"]["dice_lesion"]
    record = {
        "benchmark": "busi real-only segmentation", "date": date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {args.num_threads} torch thread(s)", "wall_seconds": round(wall, 1),
        "dice_mean": dice["mean"], "dice_ci95": dice["ci95"], "dice_per_seed": dice["values"],
        "dice_lesion_mean": lesion["mean"], "dice_lesion_ci95": lesion["ci95"],
        "iou_mean": summary["groups"][0]["metrics"]["iou"]["mean"],
        "hd95_mean": summary["groups"][0]["metrics"]["hd95"]["mean"],
        "settings": summary["settings"], "images": summary["images"],
    }
    (args.output_dir / "benchmark.json").write_text(json.dumps(record, indent=1))
    print(f"BUSI real-only {args.network} {args.resolution} px, {args.seeds} seeds: test Dice "
          f"{dice['mean']:.3f} ± {dice['ci95']:.3f} (per seed {', '.join(f'{v:.3f}' for v in dice['values'])}); "
          f"lesion-image Dice {lesion['mean']:.3f} ± {lesion['ci95']:.3f}; wall {wall / 60:.1f} min")
    return record


if __name__ == "__main__":
    main(parse_args())
