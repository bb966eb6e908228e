"""Exporting a dataset folder for other tools: Hugging Face `imagefolder`'s split layout.

`load_dataset("imagefolder", data_dir=...)` ignores a `split` column, so a medaug folder loads as one train split.
The export writes one subfolder per split (`train/`, `validation/`, `test/`, HF's names), each with its files and
a `metadata.parquet` naming them from there. HF reads every `*_file_name` column as an image, so masks arrive as
images in a `mask` column and edge maps in `conditioning_image`; embedding files, which are not images, are named
in `embedding_path`. The metadata is Parquet, not JSON Lines, because HF requires every split's metadata to have
the same column types: a split whose rows all lack a mask would make the mask column null-typed in JSON Lines,
while Parquet keeps it a string column with empty cells.

Raster files (PNG, JPEG, TIFF, BMP) are copied unchanged. DICOM and NIfTI, which HF cannot decode, are read
through `medaug.data.loading` (the same pixels medaug trains on: LUTs applied, NIfTI in RAS) and written as PNG,
8-bit where the values fit, else 16-bit, so nothing is clipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from medaug.data.folder import METADATA_NAMES, DatasetFolder, is_file_column
from medaug.data.loading import image_format, read_array, rescale_to_unit
from medaug.outputs import refuse_foreign_entries, refuse_input_folder

EXPORT_FORMATS = ("imagefolder",)
# medaug's split names and the folders HF's imagefolder maps to its train / validation / test splits.
HF_SPLIT_FOLDERS = {"train": "train", "val": "validation", "test": "test"}
HF_METADATA_NAME = "metadata.parquet"
# File columns that are not images: renamed so that HF keeps them as paths instead of decoding them.
NON_IMAGE_COLUMNS = {"embedding_file_name": "embedding_path"}
# Columns that describe the source files and mean nothing once each row is one 2D image in its split folder.
DROPPED_COLUMNS = ("split", "slice_index")


def export_dataset(dataset_dir: str | Path, output_dir: str | Path, export_format: str = "imagefolder",
                   overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write `dataset_dir` in `export_format` to `output_dir`; return the rows written per output split."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--format: unknown format '{export_format}'; expected one of {', '.join(EXPORT_FORMATS)}")
    return export_imagefolder(dataset_dir, output_dir, overwrite=overwrite, progress=progress)


def export_imagefolder(dataset_dir: str | Path, output_dir: str | Path, overwrite: bool = False,
                       progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write the dataset in HF imagefolder's split layout; return the rows written per HF split."""
    folder = DatasetFolder(dataset_dir)
    folder.check(read_images=False)  # every path, split and duplicate, before anything is written
    output_dir = Path(output_dir)
    _prepare_output(folder.root, output_dir, overwrite)
    written = {}
    for split, hf_name in HF_SPLIT_FOLDERS.items():
        rows = [index for index in range(len(folder)) if folder.split(index) == split]
        if rows:
            _export_split(folder, rows, output_dir / hf_name, progress)
            written[hf_name] = len(rows)
    return written


def _prepare_output(dataset_root: Path, output_dir: Path, overwrite: bool) -> None:
    refuse_input_folder(output_dir, {"DATASET_DIR": dataset_root})
    existing = [output_dir / name for name in METADATA_NAMES]
    existing += [output_dir / split / name for split in ("train", "validation", "val", "test")
                 for name in METADATA_NAMES]
    existing = [path for path in existing if path.exists()]
    if not existing:  # no dataset of an earlier run here: the folder must hold nothing of the user's
        refuse_foreign_entries(output_dir, "medaug")
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a dataset ({existing[0].relative_to(output_dir)}); "
                              "choose another folder or pass overwrite")
    for path in existing:
        path.unlink()  # a stale split left from an earlier export would load as part of this one
    output_dir.mkdir(parents=True, exist_ok=True)


def _export_split(folder: DatasetFolder, rows: list[int], target: Path, progress) -> None:
    file_columns = [column for column in folder.table.columns if is_file_column(column)]
    records, written = [], {}
    for index in rows:
        record = {column: folder.value(index, column) for column in folder.table.columns
                  if column not in DROPPED_COLUMNS}
        for column in file_columns:
            record[column] = _export_file(folder, index, column, target, written) if record[column] else None
        records.append({NON_IMAGE_COLUMNS.get(column, column): value for column, value in record.items()})
        if progress is not None:
            progress(1)
    _write_metadata(records, target / HF_METADATA_NAME)


def _export_file(folder: DatasetFolder, index: int, column: str, target: Path, written: dict[str, str]) -> str:
    """Copy or convert one row's file into the split folder; return its name relative to that folder."""
    source = folder.path(index, column)
    relative = _relative_in_split(folder, index, column)
    convert = column not in NON_IMAGE_COLUMNS and image_format(source) != "raster"
    slice_index = folder.slice_index(index)
    name = _converted_name(relative, slice_index) if convert else relative
    if written.setdefault(name, folder.value(index, column)) != folder.value(index, column):
        raise ValueError(f"{folder.describe_row(index)}, column '{column}': {folder.value(index, column)} and "
                         f"{written[name]} would both be exported as {target.name}/{name}; rename one")
    destination = target / name
    if convert:
        _write_png(_png_pixels(read_array(source, slice_index)), destination)
    elif not destination.exists() or not os.path.samefile(source, destination):
        _copy(source, destination)
    return name


def _relative_in_split(folder: DatasetFolder, index: int, column: str) -> str:
    """The file's path below its split folder: as the metadata names it, less the subfolder of the split layout."""
    relative = PurePosixPath(os.path.normpath(folder.value(index, column)).replace(os.sep, "/"))
    if folder.origins is not None:
        relative = relative.relative_to(folder.origins[index].folder)
    return str(relative)


def _converted_name(relative: str, slice_index: int | None) -> str:
    path = PurePosixPath(relative)
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    suffix = f"_slice{slice_index}" if slice_index is not None else ""
    return str(path.with_name(f"{stem}{suffix}.png"))


def _png_pixels(array: np.ndarray) -> np.ndarray:
    """8-bit where every value is a whole number in 0..255 (8-bit images, label masks), otherwise 16-bit over the
    image's own range, as medaug rescales wide data before any 8-bit conversion."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = np.asarray(array)
    if values.size and values.min() >= 0 and values.max() <= 255 and np.array_equal(values, np.round(values)):
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.integer) and values.size and values.min() >= 0 and values.max() <= 65535:
        return values.astype(np.uint16)
    return np.round(rescale_to_unit(values) * 65535).astype(np.uint16)


def _write_png(pixels: np.ndarray, target: Path) -> None:
    import cv2

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial.png")  # OpenCV picks the encoder by the suffix
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if pixels.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    if not cv2.imwrite(str(partial), pixels):
        raise OSError(f"{target}: could not write the PNG")
    os.replace(partial, target)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _write_metadata(records: list[dict], target: Path) -> None:
    """Every column a string column (empty file cells null), so that all splits share one schema."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("medaug export writes metadata.parquet and needs pyarrow: "
                          "pip install 'medaug[parquet]'") from error
    columns = list(records[0])
    schema = pa.schema([(column, pa.string()) for column in columns])
    table = pa.Table.from_pylist(records, schema=schema)
    partial = target.with_name(f".{target.name}.partial")
    pq.write_table(table, partial)
    os.replace(partial, target)
