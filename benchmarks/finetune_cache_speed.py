#!/usr/bin/env python
"""Training steps/s of finetune.py with the latent/condition cache against encoding every step (--no_cache).

    python benchmarks/finetune_cache_speed.py [--data ../shared/datasets/busi] [--output results.json]

For each preset (tiny at 64 px, small at 128 px) it makes a from-scratch base, then runs the same finetune.py
command three times: cache cold (encodes once, writes the cache), cache warm (reads it), and --no_cache
(the baseline: VAE and condition encoder every step, as stock training loops do). It prints steps/s of the
training loop and the warm/no-cache ratio, and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "busi"
PRESET_RUNS = {"tiny": {"steps": 30, "batch": 4}, "small": {"steps": 10, "batch": 4}}


def load_finetune():
    from medaug.scripts import finetune

    return finetune


def run_once(finetune, base, data, work, cache, steps, batch, extra):
    args = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir",
            str(work / f"out-{time.monotonic_ns()}"), "--latent_cache_dir", str(cache), "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), "--max_train_samples", str(batch * steps), "--report_to", "none",
            "--checkpointing_steps", "100000", *extra]
    started = time.perf_counter()
    summary = finetune.main(finetune.parse_args(args))
    return {"steps_per_second": summary["steps_per_second"], "wall_seconds": time.perf_counter() - started,
            "computed": summary["computed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="Dataset folder (BUSI by default; phantom if absent).")
    parser.add_argument("--output", default="finetune_cache_speed.json")
    parser.add_argument("--presets", default="tiny,small")
    options = parser.parse_args()
    from medaug.data import make_phantom_dataset
    from medaug.models import init_model

    finetune = load_finetune()
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "presets": {}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = Path(options.data)
        if not (data / "metadata.csv").is_file():
            data = make_phantom_dataset(work / "phantom", num_images=200, size=128)
        results["data"] = str(data)
        for preset in options.presets.split(","):
            base = work / f"base-{preset}"
            init_model(base, preset=preset)
            plan = PRESET_RUNS[preset]
            cache = work / f"cache-{preset}"
            runs = {name: run_once(finetune, base, data, work, cache, plan["steps"], plan["batch"], extra)
                    for name, extra in (("cache_cold", []), ("cache_warm", []), ("no_cache", ["--no_cache"]))}
            warm, stock = runs["cache_warm"]["steps_per_second"], runs["no_cache"]["steps_per_second"]
            runs["speedup_warm_vs_no_cache"] = warm / stock
            results["presets"][preset] = {"steps": plan["steps"], "batch": plan["batch"], **runs}
    print(f"{'preset':8} {'cache warm':>12} {'no cache':>12} {'ratio':>7} {'cold wall s':>12}")
    for preset, runs in results["presets"].items():
        print(f"{preset:8} {runs['cache_warm']['steps_per_second']:12.2f} {runs['no_cache']['steps_per_second']:12.2f} "
              f"{runs['speedup_warm_vs_no_cache']:7.2f} {runs['cache_cold']['wall_seconds']:12.1f}")
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
