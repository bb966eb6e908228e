"""`medaug train-encoder`: a self-supervised (SimCLR) domain encoder for `medaug evaluate --features encoder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail, progress_bar
from medaug.outputs import OutputFolderError, output_lock, refuse_foreign_entries, refuse_input_folder


def train_encoder_command(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder of real images (metadata.csv).")],
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder to save the encoder into.")],
    split: Annotated[str, typer.Option("--split", help="Split to train on (never the test split you report on).")]
    = "train",
    max_train_steps: Annotated[int, typer.Option("--max_train_steps", min=1, help="Optimiser steps.")] = 1000,
    train_batch_size: Annotated[int, typer.Option("--train_batch_size", min=2, help="Images per step "
                                                  "(two views each).")] = 64,
    learning_rate: Annotated[float, typer.Option("--learning_rate", help="Peak AdamW learning rate "
                                                 "(warm-up, then cosine decay).")] = 1e-3,
    resolution: Annotated[int, typer.Option("--resolution", min=32, help="Image side in pixels.")] = 96,
    channels: Annotated[Optional[int], typer.Option("--channels", help="1 or 3 (default: what the images hold).")]
    = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature of SimCLR's loss.")] = 0.2,
    fit: Annotated[str, typer.Option("--fit", help="How images become square: pad, crop or stretch.")] = "pad",
    max_train_samples: Annotated[Optional[int], typer.Option(
        "--max_train_samples", min=2, help="Train on a seeded random subset of at most this many images.")] = None,
    max_images: Annotated[Optional[int], typer.Option(
        "--max_images", min=2, hidden=True, help="Old name of --max_train_samples.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for weights, batches and augmentations.")] = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an encoder already in --output_dir.")]
    = False,
) -> None:
    """Train a small ResNet with SimCLR on a dataset's images, so a domain distance exists offline."""
    import torch

    from medaug.data import DatasetError, ImageReadError
    from medaug.metrics.encoder import load_training_images, train_encoder
    from medaug.metrics.imagesets import open_image_set, set_channels

    if (output_dir / "config.json").exists() and not overwrite:
        fail(f"--output_dir: {output_dir} already holds an encoder; choose another folder or pass --overwrite")
    try:
        refuse_input_folder(output_dir, {"DATASET_DIR": dataset_dir})
        if not (output_dir / "config.json").exists():  # no encoder here: nothing of the user's may be
            refuse_foreign_entries(output_dir, "medaug train-encoder")
    except OutputFolderError as error:
        fail(str(error))
    if max_images is not None and max_train_samples not in (None, max_images):
        fail("--max_images is the old name of --max_train_samples; give one")
    max_train_samples = max_train_samples if max_train_samples is not None else max_images
    if channels not in (None, 1, 3):
        fail(f"--channels must be 1 or 3, got {channels}")
    if fit not in ("pad", "crop", "stretch"):
        fail(f"--fit: unknown mode '{fit}'; expected pad, crop or stretch")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        channels = channels or set_channels(open_image_set(dataset_dir, split, "DATASET_DIR"))[0]
        images = load_training_images(dataset_dir, split, channels, resolution, fit, max_train_samples)
    except (DatasetError, ImageReadError, ValueError) as error:
        fail(f"DATASET_DIR: {error}")
    console.print(f"training a SimCLR encoder on {images.shape[0]} images ({channels} channel(s), "
                  f"{resolution} px) for {max_train_steps} steps on {device}")
    losses: list[float] = []
    with output_lock(output_dir), progress_bar("train-encoder") as bar:
        task = bar.add_task("steps", total=max_train_steps)

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            bar.update(task, advance=1, description=f"loss {loss:.3f}")

        train_encoder(images, output_dir, max_train_steps=max_train_steps, train_batch_size=train_batch_size,
                      learning_rate=learning_rate, temperature=temperature, seed=seed, fit=fit, device=device,
                      on_step=on_step)
    arguments = {"dataset_dir": str(dataset_dir), "split": split, "images": int(images.shape[0]),
                 "max_train_steps": max_train_steps, "train_batch_size": train_batch_size,
                 "learning_rate": learning_rate, "resolution": resolution, "channels": channels,
                 "temperature": temperature, "fit": fit, "max_train_samples": max_train_samples, "seed": seed}
    (output_dir / "medaug_args.json").write_text(json.dumps(arguments, indent=2), encoding="utf-8")
    window = max(1, len(losses) // 10)
    console.print(f"loss {sum(losses[:window]) / window:.3f} (first {window} steps) -> "
                  f"{sum(losses[-window:]) / window:.3f} (last {window}); encoder saved to {output_dir}")
