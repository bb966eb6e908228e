"""Nested, stratified real subsets for a low-data study, each written as a dataset folder of its own.

The fractions share one draw: within each label, patients (or rows, where there is no `patient_id`) are put in one
seeded order, and a fraction takes the first round(fraction x n) of them. So the 10% subset lies inside the 25%
one, which lies inside 100%, and a patient's images are never split between a subset and what it left out. Every
val and test row is kept (a source without val rows has them carved from train first), and the files are
copied, so a generator trained on a subset's folder cannot read a training row outside it.
"""

from __future__ import annotations

import math
from pathlib import Path

from medaug.data.folder import DatasetFolder
from medaug.data.subset import patient_order, write_rows
from medaug.data.validation import ensure_validation


def nested_subsets(folder: DatasetFolder, fractions: list[float], seed: int = 0, split: str = "train",
                   label_column: str = "label") -> dict[float, list[int]]:
    """{fraction: sorted training row indices}, stratified by label, whole patients, nested across fractions."""
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--real_fractions: each must be in (0, 1], got {fraction}")
    orders = patient_order(folder, folder.indices(split), seed, label_column)
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
    """Each fraction's subset as `output_dir/f<fraction>/` (kept when it is already there and complete). A source
    without a val split has one carved from train first (`medaug.data.validation`), so every subset holds the same
    val rows and no generator trains on them."""
    folder = DatasetFolder(source)
    ensure_validation(folder, label_column, log=False)
    subsets = nested_subsets(folder, fractions, seed, label_column=label_column)
    paths = {}
    for fraction, rows in subsets.items():
        target = Path(output_dir) / subset_name(fraction)
        if not (target / "metadata.csv").is_file():
            keep = [i for i in range(len(folder)) if folder.split(i) != "train" or i in set(rows)]
            write_rows(folder, target, keep)
        paths[fraction] = target
    return paths
