"""A dataset folder: `metadata.csv` or `metadata.jsonl` beside the files it names.

Two layouts are read. Flat: one metadata file at the top, rows carrying a `split` column. Hugging Face
`imagefolder`'s split layout: subfolders `train/`, `validation/` (or `val/`) and `test/`, each with its own
metadata file naming files relative to that subfolder. The split layout is read into the same table as the flat
one: every row gets the split of its subfolder, and columns that HF reads as files (`file_name`, `*_file_name`)
are prefixed with the subfolder, so `train/a.png` names the file relative to the dataset folder as in a flat one.

Every check reports the row, column and file at fault. `DatasetFolder` raises `DatasetError` at once for
problems with the table itself (missing file, missing column, empty table) and collects per-row problems
in `scan`, so that `medaug inspect` can list all of them in one pass.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medaug.data.loading import ImageReadError, image_format, read_array

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("file_name",)
IMAGE_COLUMNS = ("file_name", "mask_file_name", "conditioning_image_file_name")
PATH_COLUMNS = IMAGE_COLUMNS + ("embedding_file_name",)
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")  # parquet: as `medaug export` writes
METADATA_CHOICES = "metadata.csv, metadata.jsonl or metadata.parquet"
# Hugging Face `imagefolder`'s split folders, and the medaug split of their rows.
SPLIT_FOLDERS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset folder, located as precisely as possible."""

    message: str
    row: int | None = None  # 1-based data row of the metadata table
    column: str | None = None
    file: str | None = None
    source: str | None = None  # the metadata file holding the row, relative to the dataset (split layout only)

    def __str__(self) -> str:
        where = [self.source] if self.source is not None else []
        if self.row is not None:
            where = [" ".join(where + [f"row {self.row}"])]
        if self.column is not None:
            where.append(f"column '{self.column}'")
        if self.file is not None:
            where.append(str(self.file))
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DatasetError(ValueError):
    """A dataset folder is unusable; `problems` lists every reason found."""

    def __init__(self, source: str | Path, problems: list[Problem]):
        self.source = str(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{self.source}: {len(self.problems)} problem(s)\n{lines}")


@dataclass
class RowStats:
    """What reading one row's files found out, for the summary."""

    height: int
    width: int
    channels: int
    dtype: str
    mask_coverage: float | None = None
    mask_levels: int = 0  # distinct values in the mask; above 2, classes that medaug reads as one foreground


@dataclass
class ScanResult:
    problems: list[Problem] = field(default_factory=list)
    stats: dict[int, RowStats] = field(default_factory=dict)


@dataclass(frozen=True)
class RowOrigin:
    """Where a row of the split layout came from: its subfolder and its row in that subfolder's metadata file."""

    folder: str
    source: str  # the metadata file, relative to the dataset folder
    row: int  # 1-based


MISSING_SPELLINGS = ("nan", "na", "n/a", "null", "none", "<na>")  # how spreadsheets and pandas write "no value"


def spells_missing(value: str) -> bool:
    """Whether a label cell holds a word for "no value" (a literal NaN would otherwise become a class)."""
    return value.strip().lower() in MISSING_SPELLINGS


def metadata_files(folder: Path) -> list[Path]:
    return [folder / name for name in METADATA_NAMES if (folder / name).is_file()]


def is_dataset_folder(path: str | Path) -> bool:
    """Whether `path` holds a metadata file, at its top or in Hugging Face's split subfolders."""
    path = Path(path)
    return path.is_dir() and bool(metadata_files(path) or split_folders(path))


def split_folders(root: Path) -> dict[str, Path]:
    """The split subfolders (`train/`, `validation/` or `val/`, `test/`) of `root` that hold a metadata file."""
    return {name: root / name for name in SPLIT_FOLDERS if metadata_files(root / name)}


def is_file_column(column: str) -> bool:
    """Columns Hugging Face `imagefolder` reads as files: `file_name` and `*_file_name`."""
    return column == "file_name" or column.endswith("_file_name")


def read_metadata(root: str | Path) -> tuple[pd.DataFrame, Path]:
    """Read the metadata table of a folder (the dataset folder, or one split subfolder) with every cell as a string
    ('' where empty)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, [Problem("dataset folder not found")])
    present = metadata_files(root)
    if not present:
        raise DatasetError(root, [Problem(f"no {METADATA_CHOICES} in the folder")])
    if len(present) > 1:
        raise DatasetError(root, [Problem(f"{' and '.join(p.name for p in present)} exist; keep one")])
    path = present[0]
    duplicated = _duplicate_columns(path)
    if duplicated:
        raise DatasetError(path, [Problem(f"appears {count} times; which one holds the value is "
                                          "ambiguous, keep one", column=name) for name, count in duplicated.items()])
    try:
        if path.suffix == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            table = _read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True, dtype=False)
            table = table.astype(object).where(table.notna(), "").astype(str)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise DatasetError(path, [Problem(f"cannot parse the table: {error}")]) from error
    table.columns = [str(column).strip() for column in table.columns]
    return table.reset_index(drop=True), path


def _duplicate_columns(path: Path) -> dict[str, int]:
    """{column: count} of the names a CSV header (or a JSON Lines object) holds more than once, compared as medaug
    reads them (stripped). pandas would rename a second `split` to `split.1`, and JSON keeps the last key."""
    names: list[list[str]] = []
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                names.append(next(csv.reader(handle), []))
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        json.loads(line, object_pairs_hook=lambda pairs: names.append([k for k, _ in pairs]) or {})
    except (ValueError, UnicodeDecodeError, OSError):
        return {}  # the table reader says what is wrong with the file
    counts: dict[str, int] = {}
    for row in names:
        for name, count in Counter(name.strip() for name in row).items():
            if count > 1:
                counts[name] = max(count, counts.get(name, 0))
    return counts


def _read_parquet(path: Path) -> pd.DataFrame:
    """A metadata.parquet (as `medaug export` writes in each split folder); pyarrow is an optional extra."""
    if importlib.util.find_spec("pyarrow") is None:
        raise DatasetError(path, [Problem("reading metadata.parquet needs pyarrow: pip install 'medaug[parquet]'")])
    return pd.read_parquet(path)


def check_table(table: pd.DataFrame, path: Path) -> None:
    """Raise DatasetError naming `path` if the table lacks a required column or has no rows."""
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise DatasetError(path, [Problem(f"required column is missing (columns: {', '.join(table.columns)})",
                                          column=column) for column in missing])
    if len(table) == 0:
        raise DatasetError(path, [Problem("the table has no rows: the dataset is empty")])


def read_split_layout(root: Path, folders: dict[str, Path]) -> tuple[pd.DataFrame, list[RowOrigin]]:
    """One table from the metadata files of the split subfolders, with each row's origin."""
    problems = []
    if metadata_files(root):
        problems.append(Problem(f"both a top-level {metadata_files(root)[0].name} and split subfolders with their own "
                                f"metadata ({', '.join(f'{name}/' for name in folders)}); keep one layout"))
    if "validation" in folders and "val" in folders:
        problems.append(Problem("both validation/ and val/ hold metadata; keep one"))
    bare = [name for name in SPLIT_FOLDERS if (root / name).is_dir() and name not in folders]
    problems += [Problem(f"split folder {name}/ has no {METADATA_CHOICES}, unlike "
                         f"{', '.join(f'{other}/' for other in folders)}") for name in bare]
    if problems:
        raise DatasetError(root, problems)
    tables, origins = [], []
    for name, folder in folders.items():
        table, path = read_metadata(folder)
        check_table(table, path)
        source = f"{name}/{path.name}"
        contradictions = _split_contradictions(table, name, source)
        if contradictions:
            raise DatasetError(path, contradictions)
        tables.append(_in_split_folder(table, name))
        origins += [RowOrigin(name, source, row) for row in range(1, len(table) + 1)]
    return pd.concat(tables, ignore_index=True).fillna("").astype(str), origins


def _split_contradictions(table: pd.DataFrame, folder: str, source: str) -> list[Problem]:
    """Rows whose `split` cell names another split than their subfolder's."""
    if "split" not in table.columns:
        return []
    expected = SPLIT_FOLDERS[folder]
    problems = []
    for index, raw in enumerate(table["split"]):
        value = str(raw).strip().lower()
        if value and SPLIT_FOLDERS.get(value, value) != expected:
            problems.append(Problem(f"split '{raw}' contradicts its folder {folder}/ (split '{expected}')",
                                    row=index + 1, column="split", file=str(table.at[index, "file_name"]) or None,
                                    source=source))
    return problems


def _in_split_folder(table: pd.DataFrame, folder: str) -> pd.DataFrame:
    """The table with its subfolder's split, and file paths relative to the dataset folder. Absolute paths are kept
    as they are, so the path check refuses them by their own name."""
    table = table.copy()
    table["split"] = SPLIT_FOLDERS[folder]
    for column in filter(is_file_column, table.columns):
        table[column] = [f"{folder}/{value}" if value.strip() and not _is_absolute(value.strip()) else value
                         for value in table[column]]
    return table


def _is_absolute(relative: str) -> bool:
    return Path(relative).is_absolute() or relative.startswith(("/", "\\"))


def mask_notices(folder: DatasetFolder, scan: ScanResult) -> dict[str, str]:
    """What a scan's masks say that is not a problem for every use, one verdict each for `medaug inspect` and the
    segmentation commands alike: {"levels": masks with more than two values (read as one foreground), and
    "empty:<split>": a split whose every mask is empty (segmentation refuses it)}."""
    notices = {}
    levels = {index: stats.mask_levels for index, stats in scan.stats.items() if stats.mask_levels > 2}
    if levels:
        first, most = min(levels), max(levels.values())
        notices["levels"] = (f"{len(levels)} mask(s) hold more than two values (as many as {most}; first "
                             f"{folder.value(first, 'mask_file_name')}); medaug reads every value above 0 as one "
                             "foreground (a multi-class mask becomes binary)")
    by_split: dict[str, list[float]] = {}
    for index, stats in scan.stats.items():
        if stats.mask_coverage is not None:
            by_split.setdefault(folder.split(index), []).append(stats.mask_coverage)
    for split, coverages in by_split.items():
        if not any(coverages):
            notices[f"empty:{split}"] = (f"split '{split}': all {len(coverages)} mask(s) are empty; a segmentation "
                                         "model cannot learn or be scored on them")
    return notices


class DatasetFolder:
    """The rows of a dataset folder, with paths resolved safely inside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        folders = split_folders(self.root) if self.root.is_dir() else {}
        # In the split layout `metadata_path` is the dataset folder itself: each row's problems name its own file.
        self.origins: list[RowOrigin] | None = None
        if folders:
            self.table, self.origins = read_split_layout(self.root, folders)
            self.metadata_path = self.root
        else:
            self.table, self.metadata_path = read_metadata(self.root)
            check_table(self.table, self.metadata_path)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"DatasetFolder({str(self.root)!r}, rows={len(self)})"

    def where(self, index: int) -> dict:
        """Where a row is, as Problem fields: its row number, and in the split layout its metadata file."""
        if self.origins is None:
            return {"row": index + 1}
        origin = self.origins[index]
        return {"row": origin.row, "source": origin.source}

    def describe_row(self, index: int) -> str:
        where = self.where(index)
        return " ".join(filter(None, [where.get("source"), f"row {where['row']}"]))

    def row_folder(self, index: int) -> Path:
        """The folder a row's paths must stay in: the dataset folder, or in the split layout its subfolder."""
        return self.root if self.origins is None else self.root / self.origins[index].folder

    def has_column(self, column: str) -> bool:
        return column in self.table.columns

    def value(self, index: int, column: str) -> str:
        """The row's cell as a stripped string; '' where the column is absent or empty."""
        if column not in self.table.columns:
            return ""
        return str(self.table.at[index, column]).strip()

    def require_filled(self, column: str, rows: list[int], missing_column: str, empty_row: str) -> None:
        """Raise DatasetError unless `column` exists and is filled in every row of `rows`; `missing_column` and
        `empty_row` say why the caller needs it."""
        if not self.has_column(column):
            raise DatasetError(self.metadata_path, [Problem(missing_column, column=column)])
        problems = [Problem(empty_row, column=column, file=self.value(i, "file_name"), **self.where(i))
                    for i in rows if not self.value(i, column)]
        if problems:
            raise DatasetError(self.metadata_path, problems)

    def split(self, index: int) -> str:
        """The row's split; a table without a `split` column is all training data."""
        return self.value(index, "split").lower() if self.has_column("split") else "train"

    def assign_split(self, rows: list[int], split: str) -> None:
        """Put `rows` in `split` in memory only (the validation carve); the folder's files are not touched."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; expected one of {SPLITS}")
        if not self.has_column("split"):
            self.table["split"] = "train"
        self.table.loc[list(rows), "split"] = split

    def indices(self, split: str | None = None) -> list[int]:
        """Row indices of one split (or all rows), raising if that split has no rows."""
        if split is not None and split not in SPLITS:
            raise DatasetError(self.metadata_path, [Problem(f"unknown split '{split}'; expected one of {SPLITS}")])
        chosen = [i for i in range(len(self)) if split is None or self.split(i) == split]
        if not chosen:
            raise DatasetError(self.metadata_path, [Problem(f"split '{split}' has no rows", column="split")])
        return chosen

    def slice_index(self, index: int) -> int | None:
        raw = self.value(index, "slice_index")
        if not raw:
            return None
        try:
            return int(float(raw))
        except ValueError:
            raise DatasetError(
                self.metadata_path,
                [Problem(f"'{raw}' is not an integer slice index", column="slice_index", **self.where(index))],
            ) from None

    def path(self, index: int, column: str) -> Path | None:
        """Absolute path named by a row's column, or None if empty; raises if it leaves the folder."""
        relative = self.value(index, column)
        if not relative:
            return None
        problem = self._path_problem(index, column, relative)
        if problem is not None:
            raise DatasetError(self.metadata_path, [problem])
        return (self.root / relative).resolve()

    def _path_problem(self, index: int, column: str, relative: str) -> Problem | None:
        location = {"column": column, "file": relative, **self.where(index)}
        if _is_absolute(relative):
            return Problem("absolute path; paths must be relative to the dataset folder", **location)
        folder = self.row_folder(index)
        if not (self.root / relative).resolve().is_relative_to(folder.resolve()):
            leaves = "the dataset folder" if folder == self.root else f"its split folder {folder.name}/"
            return Problem(f"path leaves {leaves}", **location)
        return None

    def scan(
        self,
        split: str | None = None,
        read_images: bool = True,
        progress: Callable[[int], None] | None = None,
        rows: list[int] | None = None,
    ) -> ScanResult:
        """Check every row (of one split, or all, or only `rows` of it) and collect problems and per-row
        statistics; problems of the table as a whole (unknown splits, duplicates) are always reported."""
        result = ScanResult()
        result.problems.extend(self._table_problems())
        chosen = range(len(self)) if rows is None else rows
        rows = chosen if split is None else [i for i in chosen if self.split(i) == split]
        if split is not None and not rows:
            result.problems.append(Problem(f"split '{split}' has no rows", column="split"))
        for index in rows:
            problems, stats = self._scan_row(index, read_images)
            result.problems.extend(problems)
            if stats is not None:
                result.stats[index] = stats
            if progress is not None:
                progress(1)
        return result

    def check(self, split: str | None = None, read_images: bool = True, rows: list[int] | None = None) -> ScanResult:
        """`scan`, raising `DatasetError` listing every problem if there is any."""
        result = self.scan(split, read_images, rows=rows)
        if result.problems:
            raise DatasetError(self.metadata_path, result.problems)
        return result

    def _table_problems(self) -> list[Problem]:
        problems = []
        if self.has_column("split"):
            for index in range(len(self)):
                value = self.split(index)
                if value not in SPLITS:
                    shown = value or "(empty)"
                    problems.append(
                        Problem(f"unknown split '{shown}'; expected one of {', '.join(SPLITS)}",
                                column="split", file=self.value(index, "file_name") or None, **self.where(index))
                    )
        problems += [Problem(f"'{self.value(index, 'label')}' spells a missing value; leave the cell empty for an "
                             "unlabelled row, or name its class", column="label",
                             file=self.value(index, "file_name") or None, **self.where(index))
                     for index in range(len(self)) if spells_missing(self.value(index, "label"))]
        rows_by_key: dict[tuple[str, str], list[int]] = {}
        for index in range(len(self)):
            key = (self.value(index, "file_name"), self.value(index, "slice_index"))
            rows_by_key.setdefault(key, []).append(index)
        for (name, slice_value), indices in rows_by_key.items():
            if name and len(indices) > 1:
                listed = ", ".join(f"{self.describe_row(i)} ({self.split(i) or 'no split'})" for i in indices)
                where = f" with slice_index {slice_value}" if slice_value else ""
                problems.append(Problem(f"listed {len(indices)} times{where}: {listed}", column="file_name", file=name))
        return problems

    def _scan_row(self, index: int, read_images: bool) -> tuple[list[Problem], RowStats | None]:
        problems: list[Problem] = []
        if not self.value(index, "file_name"):
            problems.append(Problem("empty file name", column="file_name", **self.where(index)))
        paths = {}
        for column in PATH_COLUMNS:
            relative = self.value(index, column)
            if not relative:
                continue
            problem = self._path_problem(index, column, relative)
            if problem is None and not (self.root / relative).is_file():
                problem = Problem("file not found", column=column, file=relative, **self.where(index))
            if problem is None and column in IMAGE_COLUMNS:
                problem = self._format_problem(index, column, relative)
            if problem is not None:
                problems.append(problem)
            else:
                paths[column] = self.root / relative
        if not read_images or "file_name" not in paths:
            return problems, None
        try:
            slice_index = self.slice_index(index)
        except DatasetError as error:
            return problems + error.problems, None
        return self._read_row(index, paths, slice_index, problems)

    def _format_problem(self, index: int, column: str, relative: str) -> Problem | None:
        try:
            image_format(self.root / relative)
        except ImageReadError as error:
            return Problem(str(error).split(": ", 1)[-1], column=column, file=relative, **self.where(index))
        return None

    def _read_row(
        self, index: int, paths: dict[str, Path], slice_index: int | None, problems: list[Problem]
    ) -> tuple[list[Problem], RowStats | None]:
        arrays = {}
        for column, path in paths.items():
            if column not in IMAGE_COLUMNS:
                continue
            try:
                arrays[column] = read_array(path, slice_index)
            except ImageReadError as error:
                message = str(error).split(": ", 1)[-1]
                problems.append(Problem(message, column=column, file=self.value(index, column), **self.where(index)))
        image = arrays.get("file_name")
        if image is None:
            return problems, None
        for column in ("mask_file_name", "conditioning_image_file_name"):
            other = arrays.get(column)
            if other is not None and other.shape[:2] != image.shape[:2]:
                problems.append(Problem(
                    f"size {other.shape[1]}x{other.shape[0]} differs from its image's "
                    f"{image.shape[1]}x{image.shape[0]} (width x height)",
                    column=column, file=self.value(index, column), **self.where(index),
                ))
        mask = arrays.get("mask_file_name")
        coverage, levels = None, 0
        if mask is not None:
            foreground = mask.max(axis=2) > 0 if mask.ndim == 3 else mask > 0
            coverage = float(np.mean(foreground))
            levels = len(np.unique(mask.max(axis=2) if mask.ndim == 3 else mask))
        channels = 1 if image.ndim == 2 else int(image.shape[2])
        return problems, RowStats(int(image.shape[0]), int(image.shape[1]), channels, str(image.dtype), coverage,
                                  levels)
