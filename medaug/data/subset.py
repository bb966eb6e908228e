"""A stratified fraction of a dataset's training rows, as a dataset folder of its own.

Low-data experiments must be fair: a generator that will augment 25% of the real training images may learn from
those 25% only. `write_subset` draws the fraction per label (so rare classes keep their share), keeps every val
and test row as they are, and copies the files, so that the new folder stands alone (dataset folders refuse links
that leave them) and anything trained on it cannot see the rows left out.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from medaug.data.folder import DatasetFolder
from medaug.files import write_text_atomic

FILE_COLUMNS = ("file_name", "mask_file_name", "conditioning_image_file_name", "embedding_file_name")


def stratified_rows(folder: DatasetFolder, split: str, fraction: float, seed: int, column: str = "label") -> list[int]:
    """Row indices of `split`: round(fraction x n) of each value of `column` (at least one per value), drawn with
    `seed`; all rows when `fraction` is 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rows = folder.indices(split)
    if fraction == 1.0:
        return rows
    groups: dict[str, list[int]] = {}
    for index in rows:
        value = folder.value(index, column) if folder.has_column(column) else ""
        groups.setdefault(value, []).append(index)
    rng = np.random.default_rng(seed)
    chosen = []
    for value in sorted(groups):
        members = groups[value]
        count = max(1, math.floor(fraction * len(members) + 0.5))
        chosen += rng.choice(members, size=count, replace=False).tolist()
    return sorted(chosen)


def write_subset(source: str | Path, target: str | Path, fraction: float, seed: int = 0, split: str = "train",
                 column: str = "label") -> Path:
    """Copy a dataset folder keeping a stratified `fraction` of its `split` rows and every other row."""
    folder = DatasetFolder(source)
    kept = set(stratified_rows(folder, split, fraction, seed, column))
    return write_rows(folder, target, [i for i in range(len(folder)) if folder.split(i) != split or i in kept])


def write_rows(folder: DatasetFolder, target: str | Path, keep: list[int]) -> Path:
    """Copy the rows `keep` of a dataset folder, with their files, into the empty folder `target`. The metadata
    is written last, under a temporary name: a folder with metadata.csv is complete."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: exists and is not empty; choose an empty folder")
    table = folder.table.iloc[keep]
    for column_name in FILE_COLUMNS:
        if column_name not in table.columns:
            continue
        for relative in table[column_name]:
            if relative:
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder.root / relative, destination)
    target.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target / "metadata.csv", table.to_csv(index=False))
    return target
