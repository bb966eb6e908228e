"""Nested, stratified real subsets for a low-data study, each written as a dataset folder of its own.

The fractions share one draw: within each label, patients (or rows, where there is no `patient_id`) are put in one
seeded order, and a fraction takes the first round(fraction x n) of them. So the 10% subset lies inside the 25%
one, which lies inside 100%, and a patient's images are never split between a subset and what it left out. Every
val and test row is kept, and the files are copied, so a generator trained on a subset's folder cannot read a
training row outside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medaug.data.folder import DatasetFolder
from medaug.data.subset import write_rows


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


def nested_subsets(folder: DatasetFolder, fractions: list[float], seed: int = 0, split: str = "train",
                   label_column: str = "label") -> dict[float, list[int]]:
    """{fraction: sorted training row indices}, stratified by label, whole patients, nested across fractions."""
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--real_fractions: each must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    orders = {}
    for label, groups in sorted(patient_groups(folder, folder.indices(split), label_column).items()):
        orders[label] = [groups[i] for i in rng.permutation(len(groups))]
    subsets = {}
    for fraction in fractions:
        chosen = []
        for groups in orders.values():
            count = len(groups) if fraction == 1.0 else max(1, math.floor(fraction * len(groups) + 0.5))
            chosen += [index for group in groups[:count] for index in group]
        subsets[fraction] = sorted(chosen)
    return subsets


def subset_name(fraction: float) -> str:
    return f"f{fraction:g}"


def write_nested_subsets(source: str | Path, output_dir: str | Path, fractions: list[float], seed: int = 0,
                         label_column: str = "label") -> dict[float, Path]:
    """Each fraction's subset as `output_dir/f<fraction>/` (kept when it is already there and complete)."""
    folder = DatasetFolder(source)
    subsets = nested_subsets(folder, fractions, seed, label_column=label_column)
    paths = {}
    for fraction, rows in subsets.items():
        target = Path(output_dir) / subset_name(fraction)
        if not (target / "metadata.csv").is_file():
            keep = [i for i in range(len(folder)) if folder.split(i) != "train" or i in set(rows)]
            write_rows(folder, target, keep)
        paths[fraction] = target
    return paths
