"""Read the real and synthetic folders of a study into data items, refusing bad input before any training.

Refused, each with the flag, folder, row or file at fault: an unreadable folder or file, a mask of another
size than its image, an empty train or test split, a train or test split whose masks are all empty (segmentation),
a segmentation study whose synthetic rows lack masks, a classification study with unlabelled rows or labels that
spell a missing value, synthetic labels the real set lacks, a test image that is also a training image (same path,
same bytes or same `patient_id`), synthetic images generated from test-split sources (by `manifest.jsonl`,
compared by identity: normalised split and name, and the source image's hash), and synthetic rows of unknown
provenance. A dataset without a val split gets the one carve of `medaug.data.validation`, said in the notes.

Provenance is all-or-nothing: every synthetic row needs a manifest line naming its source, the source's split and
the run, whose recorded hashes match the image (and mask) now in the folder, so rows merged in from another folder
or files swapped afterwards are caught. `allow_unknown_provenance` uses such rows anyway and says so in the notes
(which the report shows).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from medaug.data import DatasetError, DatasetFolder, ScanResult, read_manifest
from medaug.data.folder import SPLIT_FOLDERS, mask_notices, spells_missing
from medaug.data.manifest import file_sha256
from medaug.data.validation import ValidationSplit, ensure_validation

TASKS = ("seg", "cls")


class StudyError(ValueError):
    """The study cannot run on this input; the message names the flag, folder, row or file."""


@dataclass
class StudyData:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    synthetic: list[dict] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    validation: ValidationSplit | None = None  # the val split's origin: the dataset's own, or carved from train


def load_study_data(task: str, real_dir: str | Path, synthetic_dirs: list[str | Path] = (),
                    label_column: str = "label", check_images: bool = True,
                    allow_unknown_provenance: bool = False) -> StudyData:
    """Check the folders and return the items of each split; raise `StudyError` on bad input."""
    if task not in TASKS:
        raise StudyError(f"task must be one of {', '.join(TASKS)}, got '{task}'")
    real, scan = _open_folder(real_dir, "--data", check_images)
    validation = _validation(real, label_column)
    notes: list[str] = [validation.describe()] if validation.carved else []
    splits = {split: _split_rows(real, split, "--data", required=True) for split in ("train", "val", "test")}
    if task == "seg":
        splits = {split: _rows_with_masks(real, rows, split, notes) for split, rows in splits.items()}
        _mask_verdicts(real, scan, notes)
    classes = _classes(real, splits, label_column) if task == "cls" else []
    real_labels = {real.value(i, label_column) for i in range(len(real))} - {""}
    items = {split: [_item(real, i, "real", label_column, classes) for i in rows] for split, rows in splits.items()}
    synthetic = []
    for directory in synthetic_dirs:
        folder, _ = _open_folder(directory, "--synthetic", check_images)
        rows = _synthetic_rows(folder, task, label_column, real_labels)
        _refuse_test_sources(folder, real, splits["test"])
        _check_provenance(folder, allow_unknown_provenance, notes)
        synthetic += [_item(folder, i, "synthetic", label_column, classes) for i in rows]
    _refuse_overlap(items["test"], items["train"] + items["val"] + synthetic, real)
    return StudyData(items["train"], items["val"], items["test"], synthetic, classes, notes, validation)


def synthetic_pool(directory: str | Path, real_dir: str | Path, allow_unknown_provenance: bool = False
                   ) -> tuple[DatasetFolder, list[str]]:
    """A synthetic folder whose images join an unlabelled pool (self-supervised pre-training: neither labels nor
    masks needed), checked as a study checks one: every row split 'train', no test-split source, provenance known
    (or accepted as a risk, which the returned notes say)."""
    real, _ = _open_folder(real_dir, "--data", check_images=False)
    folder, _ = _open_folder(directory, "--synthetic", check_images=True)
    _synthetic_rows(folder, "pool", "", set())
    _refuse_test_sources(folder, real, _split_rows(real, "test", "--data", required=False))
    notes: list[str] = []
    _check_provenance(folder, allow_unknown_provenance, notes)
    return folder, notes


def _open_folder(directory: str | Path, flag: str, check_images: bool) -> tuple[DatasetFolder, ScanResult]:
    try:
        folder = DatasetFolder(directory)
        return folder, folder.check(read_images=check_images)
    except DatasetError as error:
        raise StudyError(f"{flag} {error}") from error


def _mask_verdicts(folder: DatasetFolder, scan: ScanResult, notes: list[str]) -> None:
    """`medaug inspect`'s mask notices, acted on: a train or test split of empty masks is refused, masks with
    more than two values are noted as read (one foreground)."""
    notices = mask_notices(folder, scan)
    for split in ("train", "test"):
        if f"empty:{split}" in notices:
            raise StudyError(f"--data {folder.metadata_path}: {notices[f'empty:{split}']}")
    if "levels" in notices:
        notes.append(f"--data: {notices['levels']}")


def _validation(folder: DatasetFolder, label_column: str) -> ValidationSplit:
    try:
        return ensure_validation(folder, label_column)
    except DatasetError as error:
        raise StudyError(f"--data {error}") from error


def _split_rows(folder: DatasetFolder, split: str, flag: str, required: bool) -> list[int]:
    rows = [i for i in range(len(folder)) if folder.split(i) == split]
    if required and not rows:
        raise StudyError(f"{flag} {folder.root}: split '{split}' has no rows (column 'split' of "
                         f"{folder.metadata_path.name}); a study needs train and test rows")
    return rows


def _rows_with_masks(folder: DatasetFolder, rows: list[int], split: str, notes: list[str]) -> list[int]:
    """Real rows without a mask cannot be scored; leave them out, and refuse a split left empty."""
    kept = [i for i in rows if folder.value(i, "mask_file_name")]
    if rows and not kept:
        raise StudyError(f"--data {folder.root}: no row of split '{split}' has a mask (column 'mask_file_name'); "
                         "a segmentation study needs masks")
    if len(kept) < len(rows):
        notes.append(f"--data: {len(rows) - len(kept)} {split} row(s) without a mask left out")
    return kept


def _classes(folder: DatasetFolder, splits: dict[str, list[int]], label_column: str) -> list[str]:
    if not folder.has_column(label_column):
        raise StudyError(f"--data {folder.metadata_path}: column '{label_column}' is missing; a classification "
                         f"study needs labels (choose the column with --label_column)")
    for split, rows in splits.items():
        missing = [i for i in rows if spells_missing(folder.value(i, label_column))]
        if missing:
            raise StudyError(f"--data {folder.metadata_path}: rows {_shorten([i + 1 for i in missing])} of split "
                             f"'{split}' spell a missing value in column '{label_column}' (e.g. "
                             f"'{folder.value(missing[0], label_column)}'); leave such cells empty or name the class")
        unlabelled = [i + 1 for i in rows if not folder.value(i, label_column)]
        if unlabelled:
            raise StudyError(f"--data {folder.metadata_path}: rows {_shorten(unlabelled)} of split '{split}' have "
                             f"an empty column '{label_column}'")
    trained = {folder.value(i, label_column) for i in splits["train"]}
    untrained = sorted({folder.value(i, label_column) for i in splits["test"] + splits["val"]} - trained)
    if untrained:
        raise StudyError(f"--data {folder.metadata_path}: label(s) {untrained} of column '{label_column}' appear "
                         "in val/test but not in train")
    if len(trained) < 2:
        raise StudyError(f"--data {folder.metadata_path}: column '{label_column}' has one class in train; "
                         "classification needs two or more")
    return sorted(trained)


def _synthetic_rows(folder: DatasetFolder, task: str, label_column: str, real_labels: set[str]) -> list[int]:
    other = [i + 1 for i in range(len(folder)) if folder.split(i) != "train"]
    if other:
        raise StudyError(f"--synthetic {folder.metadata_path}: rows {_shorten(other)} are not split 'train'; "
                         "a synthetic folder only adds training data")
    rows = list(range(len(folder)))
    if task == "seg":
        missing = [i + 1 for i in rows if not folder.value(i, "mask_file_name")]
        if missing:
            raise StudyError(f"--synthetic {folder.metadata_path}: rows {_shorten(missing)} have no mask "
                             "(column 'mask_file_name'); a segmentation study needs a mask for every image")
    if task == "cls" or folder.has_column(label_column):
        labels = {folder.value(i, label_column) for i in rows}
        if task == "cls" and "" in labels:
            unlabelled = [i + 1 for i in rows if not folder.value(i, label_column)]
            raise StudyError(f"--synthetic {folder.metadata_path}: rows {_shorten(unlabelled)} have an empty "
                             f"column '{label_column}'")
        unknown = sorted(labels - real_labels - {""}) if real_labels else []
        if unknown:
            raise StudyError(f"--synthetic {folder.metadata_path}: label(s) {unknown} of column '{label_column}' "
                             f"are not in the real set (which has {sorted(real_labels)})")
    return rows


def _refuse_test_sources(folder: DatasetFolder, real: DatasetFolder, test_rows: list[int]) -> None:
    """Synthetic images made from a real test image would score the model on what it was shown. A source is
    compared by identity: its split and file name after normalisation (case, spaces, separators, `./`), and the
    bytes of its image where the manifest recorded their hash."""
    test_names = {_normal_name(real.value(i, "file_name")) for i in test_rows}
    entries = read_manifest(folder.root)
    hashed = any(entry.source_sha256 for entry in entries)
    test_hashes = {file_sha256(real.path(i, "file_name")) for i in test_rows} if hashed else set()
    for number, entry in enumerate(entries, start=1):
        same_dataset = not entry.source_dataset or _same_dataset(entry.source_dataset, real.root)
        if (_normal_split(entry.source_split) == "test" or entry.source_sha256 in test_hashes
                or same_dataset and _normal_name(entry.source_file_name) in test_names):
            raise StudyError(f"--synthetic {folder.root}: manifest.jsonl line {number} ({entry.file_name}) was "
                             f"generated from test-split source '{entry.source_file_name}' (split "
                             f"'{entry.source_split}'); synthetic training data must come from training sources only")


def _normal_split(value: str) -> str:
    value = value.strip().lower()
    return SPLIT_FOLDERS.get(value, value)


def _normal_name(value: str) -> str:
    return posixpath.normpath(value.strip().replace("\\", "/")).lower() if value.strip() else ""


def _check_provenance(folder: DatasetFolder, allow_unknown: bool, notes: list[str]) -> None:
    """Refuse (or, when allowed, note as a risk) synthetic rows whose provenance is unknown."""
    entries = {entry.file_name: entry for entry in read_manifest(folder.root)}
    gaps = [f"row {i + 1} ({folder.value(i, 'file_name')}): {gap}" for i in range(len(folder))
            if (gap := _provenance_gap(folder, i, entries.get(folder.value(i, "file_name"))))]
    if not gaps:
        return
    message = (f"--synthetic {folder.root}: {len(gaps)} of {len(folder)} row(s) have unknown provenance, e.g. "
               + "; ".join(gaps[:3]))
    if not allow_unknown:
        raise StudyError(message + ". Every synthetic row needs a manifest.jsonl line (as medaug generate writes) "
                         "naming its source, split and run, with the hash of its image; pass "
                         "--allow_unknown_provenance to use the folder anyway, at the risk of test-split leakage")
    notes.append("RISK (--allow_unknown_provenance): " + message + "; test-split leakage cannot be ruled out")


def _provenance_gap(folder: DatasetFolder, index: int, entry) -> str:
    """Why row `index` has unknown provenance, or "" if its manifest line vouches for it."""
    if entry is None:
        return "no manifest.jsonl line"
    missing = [name for name in ("source_file_name", "source_split", "model_dir", "sha256") if not getattr(entry, name)]
    if missing:
        return f"its manifest line lacks {', '.join(missing)}"
    if file_sha256(folder.path(index, "file_name")) != entry.sha256:
        return "the image is not the one generated (its hash differs from the manifest's)"
    mask = folder.value(index, "mask_file_name")
    if mask and (mask != entry.mask_file_name or not entry.mask_sha256
                 or file_sha256(folder.path(index, "mask_file_name")) != entry.mask_sha256):
        return "the mask is not the one the image was generated for"
    return ""


def _same_dataset(source: str, real_root: Path) -> bool:
    path = Path(source)
    try:
        return path.resolve() == real_root or path.name == real_root.name
    except OSError:
        return path.name == real_root.name


def _refuse_overlap(test: list[dict], training: list[dict], real: DatasetFolder) -> None:
    by_path = {item["image"]: item for item in training}
    by_patient = {item["patient_id"]: item for item in training if item["patient_id"]}
    by_bytes: dict[str, dict] = {}
    for item in training:
        by_bytes.setdefault(_digest(item["image"]), item)
    for item in test:
        clash, reason = by_path.get(item["image"]), "is the same file as"
        if clash is None and item["patient_id"] in by_patient:
            clash, reason = by_patient[item["patient_id"]], f"has the same patient_id '{item['patient_id']}' as"
        if clash is None:
            clash, reason = by_bytes.get(_digest(item["image"])), "has the same bytes as"
        if clash is not None:
            raise StudyError(f"--data {real.metadata_path}: test image {item['file_name']} {reason} "
                             f"{clash['origin']} training image {clash['file_name']} ({clash['folder']}); "
                             "the test split must not overlap training")


def _digest(path: str) -> str:
    return hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()


def _item(folder: DatasetFolder, index: int, origin: str, label_column: str, classes: list[str]) -> dict:
    label = folder.value(index, label_column)
    mask = folder.path(index, "mask_file_name")
    slice_index = folder.slice_index(index)
    return {
        "image": str(folder.path(index, "file_name")),
        "mask": str(mask) if mask is not None else "",
        "slice_index": -1 if slice_index is None else slice_index,
        "label": classes.index(label) if label in classes else -1,
        "label_name": label,
        "file_name": folder.value(index, "file_name"),
        "patient_id": folder.value(index, "patient_id"),
        "origin": origin,
        "folder": str(folder.root),
    }


def _shorten(numbers: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")
