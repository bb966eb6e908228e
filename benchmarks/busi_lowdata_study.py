"""The low-data study on BUSI: does synthetic data beat real-only (and real+classical) at 25% real labels?

Runs `medaug study seg` on ../shared/datasets/busi at 25% (add 0.1 with --real_fractions) with the mask-channel
diffusion generator and pix2pix, new mask shapes, 3 seeds, one subset draw (--subset_draws for more) and every arm
at the engine's recipe (--seg_steps, --seg_resolution), then writes the summary rows, the real-only learning curve,
the wall time and the machine to --record (JSON). The study folder resumes; delete it for a fresh
timing. The issue's target: the best synthetic arm >= +5 Dice over real-only and >= +2 over real+classical, each
with the 95% CI of the paired difference above 0.

    python benchmarks/busi_lowdata_study.py --output_dir /tmp/medaug-study25
    python benchmarks/busi_lowdata_study.py --quick --output_dir /tmp/medaug-study-quick   # minutes, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "busi")
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/medaug-benchmarks/busi-lowdata-study"))
    parser.add_argument("--real_fractions", default="0.25")
    parser.add_argument("--generators", default="mask_channels,pix2pix")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--subset_draws", type=int, default=1)
    parser.add_argument("--seg_steps", type=int, default=None, help="Default: the engine's (1500).")
    parser.add_argument("--seg_resolution", type=int, default=None, help="Default: the engine's.")
    parser.add_argument("--arms", default=None, help="Comma-separated (default: the study's).")
    parser.add_argument("--no_mask_augment", action="store_true", help="Generate for the subset's own masks only.")
    parser.add_argument("--filter", default=None, help="As medaug study seg --filter (0.5 or q0.25).")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", type=Path, default=None, help="JSON to write (default: OUTPUT_DIR/benchmark.json)")
    return parser.parse_args(input_args)


def main(args) -> dict:
    from medaug.lowdata.study import run_lowdata_study, settings_from_flags

    settings = settings_from_flags(
        args.quick, real_fractions=tuple(float(f) for f in args.real_fractions.split(",")),
        seeds=None if args.quick else args.seeds, generators=tuple(args.generators.split(",")),
        mask_augment=not args.no_mask_augment, filter=args.filter, subset_draws=args.subset_draws,
        seg_steps=args.seg_steps, seg_resolution=args.seg_resolution,
        arms=tuple(args.arms.split(",")) if args.arms else None)
    started = time.perf_counter()
    summary = run_lowdata_study(args.data, args.output_dir, settings, on_stage=lambda text: print(f"== {text}"))
    record = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "wall_seconds": time.perf_counter() - started,
              "command": "python benchmarks/busi_lowdata_study.py " + " ".join(
                  f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)),
              "rows": summary["rows"], "generators": summary["generators"], "recipe": summary["recipe"],
              "learning_curve": summary["learning_curve"]}
    path = args.record or args.output_dir / "benchmark.json"
    path.write_text(json.dumps(record, indent=1))
    print((args.output_dir / "results.md").read_text())
    print(f"wall {record['wall_seconds'] / 60:.1f} min; written {path}")
    return record


if __name__ == "__main__":
    main(parse_args())
