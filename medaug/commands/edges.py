"""`medaug edges`: write a dataset folder whose rows name ControlNet edge maps in conditioning_image_file_name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail, progress_bar
from medaug.outputs import output_lock


def edges_command(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder to make edge maps for.")],
    output_dir: Annotated[Path, typer.Option(
        "--output_dir", help="Folder for the new dataset: copies of images and masks, edges/, metadata.csv.")],
    method: Annotated[str, typer.Option(
        "--method", help="canny, sobel, scharr, mask_boundary (needs masks) or fused (canny + mask boundary).")
    ] = "canny",
    split: Annotated[Optional[str], typer.Option("--split", help="Only rows of this split.")] = None,
    low: Annotated[Optional[float], typer.Option(
        "--low", min=0, max=255, help="Canny low threshold (grey levels); default 0.67 x the image's median.")] = None,
    high: Annotated[Optional[float], typer.Option(
        "--high", min=0, max=255, help="Canny high threshold (grey levels); default 1.33 x the median.")] = None,
    thickness: Annotated[Optional[int], typer.Option(
        "--thickness", min=1, help="Mask boundary width in pixels (mask_boundary, fused).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write over a dataset already there.")] = False,
) -> None:
    """Compute edge maps (Canny, Sobel, Scharr, mask boundary, fused) and write them as a dataset folder."""
    from medaug.data import DatasetFolder
    from medaug.edges import EDGE_METHODS, METHOD_OPTIONS, write_edge_dataset

    if method not in EDGE_METHODS:
        fail(f"--method: unknown edge method '{method}'; expected one of {', '.join(EDGE_METHODS)}")
    options = {"low": low, "high": high, "thickness": thickness}
    for name, value in options.items():
        if value is not None and name not in METHOD_OPTIONS[method]:
            fail(f"--{name} does not apply to --method {method}")
    options = {name: value for name, value in options.items() if value is not None}
    try:
        rows = len(DatasetFolder(dataset_dir).indices(split))
        with output_lock(output_dir), progress_bar(f"edges ({method})") as progress:
            task = progress.add_task("rows", total=rows)
            write_edge_dataset(dataset_dir, output_dir, method, split=split, overwrite=overwrite,
                               progress=lambda n: progress.advance(task, n), **options)
    except FileExistsError as error:
        fail(f"--output_dir: {error.args[0].replace('pass overwrite', 'pass --overwrite')}")
    except ValueError as error:  # DatasetError, ImageReadError, or a bad value such as --low above --high
        fail(str(error))
    console.print(f"wrote {rows} {method} edge maps and their images to {output_dir}")
