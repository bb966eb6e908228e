"""One rule for a dataset that ships train and test rows but no validation split.

A command that selects or stops on validation data (the segmenters of `bench`, `study` and the demo, the label-
fidelity scorer of `evaluate`, the linear probes of `ssl`) and finds no `val` row carves one from train: an eighth of
each label's training patients (whole patients where `patient_id` exists, single rows otherwise; a label with one
patient keeps it), in an order drawn with seed 0. The carve depends on the train rows and the label column only,
so every stage of a run, and every command, carves the same rows. It lives in memory: nothing is written to the
dataset folder, and test rows are never touched. Commands that need no validation split use every train row and
say nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medaug.data.folder import DatasetError, DatasetFolder, Problem
from medaug.data.subset import patient_order

CARVE_FRACTION = 1 / 8
CARVE_SEED = 0

logger = logging.getLogger("medaug.data.validation")


@dataclass(frozen=True)
class ValidationSplit:
    """Where a command's validation rows came from: the dataset's own val split, or the carve from train."""

    files: tuple[str, ...]  # the file_name of each validation row, in row order
    carved_from: int | None = None  # train rows before the carve; None: the dataset's own val split

    @property
    def carved(self) -> bool:
        return self.carved_from is not None

    def origin(self) -> str:
        """Where the rows came from, as the object of a sentence ("selected on ...")."""
        if not self.carved:
            return f"the dataset's val split ({len(self.files)} rows)"
        return (f"{len(self.files)} rows carved from its {self.carved_from} train rows, as the dataset has no val "
                f"split (an eighth of each label's patients, seed {CARVE_SEED}; test rows untouched)")

    def describe(self) -> str:
        """The line the log and the reports show."""
        return f"validation: {self.origin()}"

    def record(self) -> dict:
        return {"source": "carved from train" if self.carved else "val split", "rows": len(self.files),
                "train_rows_before": self.carved_from, "text": self.describe(), "origin": self.origin(),
                "files": list(self.files)}


def ensure_validation(folder: DatasetFolder, label_column: str = "label", log: bool = True) -> ValidationSplit:
    """Give `folder` a val split: its own, or where it has none the carve (in memory, said in the log). Raises
    DatasetError, naming the folder, when there is neither a val split nor enough train rows to carve one."""
    own = val_rows(folder)
    if own:
        return ValidationSplit(tuple(folder.value(i, "file_name") for i in own))
    train = [i for i in range(len(folder)) if folder.split(i) == "train"]
    carved = sorted(carve_rows(folder, train, label_column))
    if not carved:
        raise DatasetError(folder.metadata_path, [Problem(
            f"no val split, and its {len(train)} train row(s) are too few to carve one from (each label needs two "
            "patients); add rows with split 'val'", column="split")])
    folder.assign_split(carved, "val")
    validation = ValidationSplit(tuple(folder.value(i, "file_name") for i in carved), carved_from=len(train))
    if log:  # a stage that carves again what an earlier one announced passes log=False
        logger.warning("%s: %s", folder.root, validation.describe())
    return validation


def val_rows(folder: DatasetFolder) -> list[int]:
    """The rows the folder itself puts in its val split (none: a command that needs one carves it)."""
    return [i for i in range(len(folder)) if folder.split(i) == "val"]


def carve_rows(folder: DatasetFolder, train: list[int], label_column: str = "label") -> list[int]:
    """The train rows the carve moves to val: the first round(n/8) patients (at least one, none of a label with
    a single patient) of each label's seeded order."""
    chosen = []
    for groups in patient_order(folder, train, CARVE_SEED, label_column).values():
        count = 0 if len(groups) < 2 else max(1, round(len(groups) * CARVE_FRACTION))
        chosen += [index for group in groups[:count] for index in group]
    return chosen
