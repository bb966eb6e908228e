"""`medaug patches`: cut whole-slide images into tissue patches, written as a dataset folder (one patient per slide)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail, progress_bar
from medaug.outputs import output_lock


def patches_command(
    slide_dir: Annotated[Path, typer.Argument(help="Folder of whole-slide images (.svs, .tif, .tiff; searched "
                                                   "below too).")],
    output_dir: Annotated[Path, typer.Option(
        "--output_dir", help="Dataset folder to write: patches/<slide id>/*.png, metadata.csv, patches.json.")],
    size: Annotated[int, typer.Option("--size", help="Patch side in pixels at --level.")] = 512,
    level: Annotated[int, typer.Option("--level", help="Pyramid level to cut from; 0 is full resolution.")] = 0,
    tissue_threshold: Annotated[float, typer.Option(
        "--tissue_threshold", help="Smallest tissue fraction of a kept patch (tissue: Otsu on HSV saturation of "
                                   "the coarsest level).")] = 0.5,
    max_patches_per_slide: Annotated[Optional[int], typer.Option(
        "--max_patches_per_slide", help="Keep at most N tissue patches per slide (a seeded draw).")] = None,
    val_fraction: Annotated[float, typer.Option(
        "--val_fraction", help="Share of slides (not patches) whose patches go to val.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(
        "--test_fraction", help="Share of slides whose patches go to test.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the slides' splits and --max_patches_per_slide.")
                    ] = 0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a patch dataset (or an unfinished run with other settings) in --output_dir.")
    ] = False,
) -> None:
    """Cut the tissue of whole-slide images into patches, as a dataset folder whose patient_id is the slide id.

    A killed run resumes where it stopped when rerun with the same arguments."""
    from medaug.data.patch_dataset import PatchSettings, write_patch_dataset
    from medaug.data.slides import find_slides

    settings = PatchSettings(size=size, level=level, tissue_threshold=tissue_threshold,
                             max_patches_per_slide=max_patches_per_slide, val_fraction=val_fraction,
                             test_fraction=test_fraction, seed=seed)
    try:
        slides = len(find_slides(slide_dir))
        with output_lock(output_dir), progress_bar("patches") as progress:
            task = progress.add_task("slides", total=slides)
            counts = write_patch_dataset(slide_dir, output_dir, settings, overwrite=overwrite,
                                         progress=lambda n: progress.advance(task, n))
    except FileExistsError as error:
        fail(f"--output_dir: {error.args[0].replace('pass overwrite', 'pass --overwrite')}")
    except ValueError as error:  # SlideError (a bad slide, by name) or a bad setting (by flag)
        fail(str(error))
    console.print(f"wrote {sum(counts.values())} patches of {len(counts)} slide(s) to {output_dir}")
