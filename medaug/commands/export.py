"""`medaug export`: write a dataset folder in a layout other tools read (Hugging Face `imagefolder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medaug.console import console, fail, progress_bar
from medaug.outputs import output_lock


def export_command(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset folder to export.")],
    output_dir: Annotated[Path, typer.Option(
        "--output_dir", help="Folder for the export: train/, validation/, test/, each with its files and "
        "metadata.parquet.")],
    export_format: Annotated[str, typer.Option(
        "--format", help="imagefolder: Hugging Face's split layout; load_dataset('imagefolder', data_dir=...) "
        "reads its splits, and masks as images.")] = "imagefolder",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write over an export already there.")] = False,
) -> None:
    """Export a dataset folder for other tools: Hugging Face imagefolder's train/validation/test layout."""
    from medaug.data import DatasetFolder
    from medaug.data.export import EXPORT_FORMATS, export_dataset

    if export_format not in EXPORT_FORMATS:
        fail(f"--format: unknown format '{export_format}'; expected one of {', '.join(EXPORT_FORMATS)}")
    try:
        rows = len(DatasetFolder(dataset_dir))
        with output_lock(output_dir), progress_bar(f"export ({export_format})") as progress:
            task = progress.add_task("rows", total=rows)
            written = export_dataset(dataset_dir, output_dir, export_format, overwrite=overwrite,
                                     progress=lambda n: progress.advance(task, n))
    except FileExistsError as error:
        fail(f"--output_dir: {error.args[0].replace('pass overwrite', 'pass --overwrite')}")
    except ImportError as error:  # pyarrow, for metadata.parquet
        fail(str(error))
    except ValueError as error:  # DatasetError, ImageReadError, two files exported under one name
        fail(str(error))
    splits = ", ".join(f"{name}: {count}" for name, count in written.items())
    console.print(f"wrote {rows} rows to {output_dir} ({splits})")
