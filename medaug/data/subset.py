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


def patient_groups(folder: DatasetFolder, rows: list[int], label_column: str = "label") -> dict[str, list[list[int]]]:
    """Per label: the rows of `rows` grouped by patient (one group per row where there is no patient_id), in row
    order. A patient is filed under the label of their first row."""
    by_patient: dict[str, list[int]] = {}
    for index in rows:
        patient = folder.value(index, "patient_id") if folder.has_column("patient_id") else ""
        by_patient.setdefault(patient or f"row-{index}", []).append(index)
    by_label: dict[str, list[list[int]]] = {}
    for members in by_patient.values():
        label = folder.value(members[0], label_column) if folder.has_column(label_column) else ""
        by_label.setdefault(label, []).append(members)
    return by_label


def patient_order(folder: DatasetFolder, rows: list[int], seed: int, label_column: str = "label"
                  ) -> dict[str, list[list[int]]]:
    """Per label (sorted): the patient groups of `rows` in one order drawn with `seed`. Taking the first k groups of
    each label is a stratified draw that keeps patients whole; the low-data subsets and the validation carve both
    draw this way."""
    rng = np.random.default_rng(seed)
    return {label: [groups[i] for i in rng.permutation(len(groups))]
            for label, groups in sorted(patient_groups(folder, rows, label_column).items())}


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
