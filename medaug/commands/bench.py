"""`medaug bench {seg,cls}`: flags in, one call to `medaug.segmentation.study.run_study`, a table out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, errors, fail, print_table, progress_bar
from medaug.outputs import output_lock
from medaug.training.arguments import COMMAND_CONFIG_HELP, config_callback

TASKS = ("seg", "cls")


def parse_numbers(text: str, flag: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0], failing with the flag named on anything else."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"{flag}: expected comma-separated numbers such as 0.5,1,2, got '{text}'")
    if not values:
        fail(f"{flag}: no numbers in '{text}'")
    return values


def bench_command(
    task: Annotated[str, typer.Argument(help="seg (segmentation: Dice, IoU, HD95) or cls (classification: AUC, "
                                        "accuracy, macro-F1, Grad-CAM).")],
    data: Annotated[Path, typer.Option("--data", help="Real dataset folder with train and test splits (val, if "
                                       "present, draws the learning curve); scores are on its test split.")],
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder for results.json, results.md, plots "
                                             "and runs/; running again on it resumes unfinished runs.")],
    synthetic: Annotated[Optional[list[Path]], typer.Option(
        "--synthetic", help="Synthetic folder (metadata.csv, manifest.jsonl); repeat the flag to pool "
        "several.")] = None,
    network: Annotated[Optional[str], typer.Option(
        "--network", help="seg: unet, attention_unet, segresnet, smp_unet (default unet); cls: densenet121, "
        "resnet18 (default densenet121).")] = None,
    resolution: Annotated[int, typer.Option("--resolution", help="Square side in pixels images are made "
                                            "(by --fit) and scored at.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps of every run, the same for every arm "
                                       "whatever its number of images.")] = 1500,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per arm (runs 0..N-1); the CI is over them.")] = 3,
    synthetic_ratios: Annotated[str, typer.Option(
        "--synthetic_ratios", help="Synthetic images per real image in the +synthetic arms.")] = "0.5,1,2",
    real_fractions: Annotated[str, typer.Option(
        "--real_fractions", help="Fractions of the real training split to train on, e.g. 0.1,0.25,1.0.")] = "1.0",
    arms: Annotated[Optional[str], typer.Option(
        "--arms", help="Comma-separated arms: real, real+classical, real+synthetic, real+classical+synthetic, "
        "synthetic_pretrain (seg), synthetic (default: all but synthetic_pretrain with --synthetic, else "
        "real,real+classical). Every arm has flips; +classical adds the heavier policy.")] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", help="Images per training step.")] = 16,
    learning_rate: Annotated[Optional[float], typer.Option(
        "--learning_rate", help="Adam learning rate (default 1e-3 for seg, 3e-4 for cls).")] = None,
    channels: Annotated[int, typer.Option("--channels", help="1 (grey) or 3 (colour) input channels.")] = 1,
    fit: Annotated[str, typer.Option("--fit", help="How images become square: stretch, pad or crop.")] = "stretch",
    select: Annotated[str, typer.Option("--select", help="Which weights are tested: last, or best_val (the best "
                                        "of about 20 validations; seg only, cls always keeps the lowest val "
                                        "loss).")] = "last",
    label_column: Annotated[str, typer.Option("--label_column", help="Metadata column with the class "
                                              "(cls; e.g. finding for covid_cxr).")] = "label",
    gradcam_images: Annotated[int, typer.Option("--gradcam_images", help="Test images per cls run to save "
                                                "Grad-CAM maps for.")] = 4,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    num_threads: Annotated[Optional[int], typer.Option(
        "--num_threads", help="CPU threads for torch (default: as many as cores are idle at the start; "
        "`medaug env` shows the choice).")] = None,
    allow_unknown_provenance: Annotated[bool, typer.Option(
        "--allow_unknown_provenance", help="Use synthetic rows that no manifest.jsonl line vouches for (source, "
        "split, run and image hash); the report then says test-split leakage cannot be ruled out.")] = False,
    config: Annotated[Optional[Path], typer.Option(
        "--config", is_eager=True, callback=config_callback, help=COMMAND_CONFIG_HELP)] = None,
) -> None:
    """Train MONAI models on real, real+synthetic, synthetic-only and classically augmented data; score them on
    the real test split with means, 95% CIs over seeds and paired tests against real-only."""
    if task not in TASKS:
        fail(f"TASK: expected seg or cls, got '{task}'")
    from medaug.segmentation.inputs import StudyError
    from medaug.segmentation.study import run_study

    arm_list = [arm.strip() for arm in arms.split(",") if arm.strip()] if arms else None
    with output_lock(output_dir), progress_bar("bench") as progress:
        bar = progress.add_task("runs", total=None)

        def on_progress(completed: float, total: int, description: str) -> None:
            progress.update(bar, completed=completed, total=total, description=description)

        try:
            summary = run_study(
                task, data, output_dir, synthetic_dirs=synthetic or [], network=network, resolution=resolution,
                channels=channels, fit=fit, steps=steps, batch_size=batch_size, select=select,
                learning_rate=learning_rate,
                seeds=seeds, synthetic_ratios=parse_numbers(synthetic_ratios, "--synthetic_ratios"),
                real_fractions=parse_numbers(real_fractions, "--real_fractions"), arms=arm_list,
                label_column=label_column, device=device, gradcam_images=gradcam_images, num_threads=num_threads,
                on_progress=on_progress, allow_unknown_provenance=allow_unknown_provenance,
            )
        except StudyError as error:
            fail(str(error))
    _print_summary(summary, output_dir)


def _print_summary(summary: dict, output_dir: Path) -> None:
    from medaug.segmentation.report import LABELS, interval_text

    rows = [[group["arm"], f"{group['real_fraction']:g}", f"{group['ratio']:g}",
             f"{group['n_train_real']}+{group['n_train_synthetic']}", str(len(group["seeds"]))]
            + [interval_text(group["metrics"][metric]) for metric in summary["metrics"]]
            for group in summary["groups"]]
    print_table(f"medaug bench {summary['task']}: real test split, mean [95% bootstrap interval]",
                ["arm", "fraction", "ratio"], ["train", "seeds"] + [LABELS[metric] for metric in summary["metrics"]],
                rows)
    for note in summary["notes"]:
        errors.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {output_dir / 'results.json'}, {output_dir / 'results.md'}, "
                  f"{len(summary['plots'])} plot(s) and {output_dir / 'report.html'}")
