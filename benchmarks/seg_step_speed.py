"""Where a segmentation arm's time goes on this CPU: one optimiser step of the engine's MONAI UNet, fp32 against
channels-last, bf16 autocast and both, and the data side (cached load + flips) against the step.

Variants run round-robin (`--rounds`), so a machine that gets busier slows them alike; the table gives the median
ms per step and each variant's speed over fp32's. Random inputs: what is timed is arithmetic, not learning.

    python benchmarks/seg_step_speed.py --resolutions 64,128 --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

VARIANTS = ("fp32", "channels_last", "bf16", "bf16+channels_last")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", default="64,128")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per variant and round (after 2 warm-up).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--record", type=Path, default=None)
    return parser.parse_args(input_args)


def time_variant(variant: str, resolution: int, batch_size: int, steps: int) -> float:
    """Median seconds of one training step of the engine's network and loss under `variant`."""
    import torch
    from monai.losses import DiceCELoss

    from medaug.segmentation.networks import build_network

    torch.manual_seed(0)
    model = build_network("seg", "unet", 1, 2)
    images = torch.rand(batch_size, 1, resolution, resolution)
    masks = (torch.rand(batch_size, 1, resolution, resolution) > 0.8).float()
    if "channels_last" in variant:
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else nullcontext()
    times = []
    for step in range(steps + 2):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(images)
        loss_function(logits.float(), masks).backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(args) -> dict:
    import torch

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rows = {}
    for resolution in [int(r) for r in args.resolutions.split(",")]:
        seconds = {variant: [] for variant in VARIANTS}
        for round_number in range(args.rounds):
            order = VARIANTS[round_number % len(VARIANTS):] + VARIANTS[:round_number % len(VARIANTS)]
            for variant in order:
                seconds[variant].append(time_variant(variant, resolution, args.batch_size, args.steps))
        medians = {variant: statistics.median(values) for variant, values in seconds.items()}
        rows[resolution] = {"ms_per_step": {v: round(1000 * m, 1) for v, m in medians.items()},
                            "speed_over_fp32": {v: round(medians["fp32"] / m, 3) for v, m in medians.items()},
                            "runs_ms": {v: [round(1000 * s, 1) for s in values] for v, values in seconds.items()}}
        print(f"{resolution} px, batch {args.batch_size}, {torch.get_num_threads()} thread(s): " + "; ".join(
            f"{v} {1000 * medians[v]:.0f} ms ({medians['fp32'] / medians[v]:.2f}x)" for v in VARIANTS), flush=True)
    record = {"benchmark": "seg step speed", "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "rows": rows}
    if args.record:
        args.record.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main(parse_args())
