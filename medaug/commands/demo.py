"""`medaug demo`: the whole chain, stage by stage, ending in OUT/report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail
from medaug.demo import DemoSettings
from medaug.outputs import output_lock


def demo_command(
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Dataset folder with masks and train/test splits (e.g. ../shared/datasets/busi); default: "
        "a phantom ultrasound dataset the demo makes itself.")] = None,
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder for every stage's outputs and "
                                             "report.html; running again resumes unfinished stages.")] = Path(
        "medaug-demo"),
    max_train_samples: Annotated[Optional[int], typer.Option(
        "--max_train_samples", min=2, help="Use the first N training rows (keeps real data quick).")] = None,
    max_train_images: Annotated[Optional[int], typer.Option(
        "--max_train_images", min=2, hidden=True, help="Old name of --max_train_samples.")] = None,
    resolution: Annotated[int, typer.Option("--resolution", help="Diffusion training and generation size.")] = (
        DemoSettings.resolution),
    finetune_steps: Annotated[int, typer.Option("--finetune_steps", min=1)] = DemoSettings.finetune_steps,
    controlnet_steps: Annotated[int, typer.Option(
        "--controlnet_steps", min=1, help="ControlNet training steps (--generator controlnet).")] = (
        DemoSettings.controlnet_steps),
    generator: Annotated[str, typer.Option(
        "--generator", help="mask_channels: the fine-tuned UNet reads each mask as an input channel (images follow "
                            "their masks, measured by label fidelity); controlnet: a text fine-tune, then a "
                            "ControlNet on mask edges.")] = DemoSettings.generator,
    consistency: Annotated[bool, typer.Option(
        "--consistency/--no_consistency", help="mask_channels: also train with the mask-consistency loss (a "
                                               "segmenter trained on the real train split must find each mask in "
                                               "the one-step clean estimate).")] = DemoSettings.consistency,
    seg_steps: Annotated[int, typer.Option("--seg_steps", min=1, help="Optimiser steps of every segmentation arm "
                                           "(the same for each, as in medaug bench and study).")] = (
        DemoSettings.seg_steps),
    seg_seeds: Annotated[int, typer.Option("--seg_seeds", min=2, help="Seeds per arm of the study.")] = (
        DemoSettings.seg_seeds),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in an --output_dir that holds a "
                                            "demo with other settings.")] = False,
) -> None:
    """Show the whole idea on one dataset: base model, VAE, fine-tuning with masks (or a ControlNet), generation
    with masks, quality metrics with label fidelity and a segmentation study real vs real+synthetic, all in
    OUT/report.html."""
    from medaug.demo import DemoError, run_demo

    if max_train_images is not None and max_train_samples not in (None, max_train_images):
        fail("--max_train_images is the old name of --max_train_samples; give one")
    settings = DemoSettings(max_train_samples=max_train_samples if max_train_samples is not None else max_train_images,
                            resolution=resolution, finetune_steps=finetune_steps,
                            controlnet_steps=controlnet_steps, generator=generator, consistency=consistency,
                            seg_steps=seg_steps,
                            seg_seeds=seg_seeds)

    def announce(number: int, total: int, title: str, done: bool) -> None:
        console.rule(f"[bold]stage {number}/{total}: {title}" + (" (done, skipped)" if done else ""))

    try:
        with output_lock(output_dir):
            report = run_demo(output_dir, data, settings, overwrite=overwrite, on_stage=announce)
    except (DemoError, FileExistsError) as error:
        fail(str(error))
    console.print(f"report: {report}")
