"""The synthetic folder `medaug generate` writes: a dataset folder (images/, masks/, metadata.csv) plus
manifest.jsonl and generate_args.json.

The manifest is the record of what is done: a file counts once its line is there, metadata.csv is rebuilt from
it, and a rerun skips what it lists. generate_args.json holds the arguments that define the images, so a rerun
with other arguments is refused instead of mixing two runs in one folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medaug.data import MANIFEST_NAME, read_manifest
from medaug.data.manifest import drop_torn_line, file_sha256
from medaug.files import partial_path, write_text_atomic
from medaug.outputs import folder_entries

ARGS_NAME = "generate_args.json"
PARTIAL_SUFFIX = ".partial"


def _recorded(output_dir: Path) -> dict | None:
    path = output_dir / ARGS_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _changes(old: dict, new: dict) -> list[str]:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _grows(old, new) -> bool:
    """A count (None: all) that is at least as large as before."""
    return new is None or (old is not None and new >= old)


def check_output_folder(output_dir: Path, settings: dict, resume: bool, overwrite: bool,
                        growable: tuple[str, ...]) -> None:
    """Refuse a non-empty folder that no generate run made (even with `overwrite`, which replaces only what
    generate wrote), and one another run made unless `overwrite`. A folder of this run (same settings) continues;
    with `resume`, the counts in `growable` may also grow. Reads only."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"--output_dir: {output_dir} exists and is not a folder")
    if not folder_entries(output_dir):
        return
    old = _recorded(output_dir)
    if old is None:
        raise FileExistsError(f"--output_dir: {output_dir} is not empty and was not written by medaug generate "
                              "(no generate_args.json); medaug replaces only its own output, so choose a new or "
                              "empty folder")
    if overwrite:
        return
    changes = _changes(old, settings)
    if not changes:
        return
    shown = "; ".join(f"{key}: was {old.get(key)!r}, now {settings.get(key)!r}" for key in changes)
    if resume and all(key in growable and _grows(old.get(key), settings.get(key)) for key in changes):
        return
    hint = (f" (--resume continues a folder only with more {' or '.join('--' + key for key in growable)})"
            if resume else "")
    raise FileExistsError(f"--output_dir: {output_dir} holds images generated with other arguments ({shown}){hint}; "
                          "pass --overwrite to replace them, or choose another folder")


def prepare_output_folder(output_dir: Path, settings: dict, overwrite: bool, masks: bool) -> None:
    """Make the folders, record the settings, and clear what an interrupted run left: temporary files and a
    torn last manifest line. With `overwrite`, remove what an earlier generate run wrote (nothing else)."""
    if overwrite and output_dir.is_dir():
        remove_generated(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (output_dir / "masks").mkdir(exist_ok=True)
    for folder in (output_dir, output_dir / "images", output_dir / "masks"):
        for stray in folder.glob(f".*{PARTIAL_SUFFIX}") if folder.is_dir() else ():
            stray.unlink()
    drop_torn_line(output_dir)
    write_text_atomic(output_dir / ARGS_NAME, json.dumps(settings, indent=2) + "\n")


def remove_generated(output_dir: Path) -> None:
    """Delete what earlier generate runs wrote here: the images and masks their manifest lists, the manifest, the
    settings and metadata.csv; images/ and masks/ only where that leaves them empty (other files are the user's)."""
    for entry in read_manifest(output_dir):
        for name in (entry.file_name, entry.mask_file_name):
            if name and (output_dir / name).resolve().is_relative_to(output_dir.resolve()):
                (output_dir / name).unlink(missing_ok=True)
    for name in ("metadata.csv", MANIFEST_NAME, ARGS_NAME):
        (output_dir / name).unlink(missing_ok=True)
    for name in ("images", "masks"):
        for stray in (output_dir / name).glob(f".*{PARTIAL_SUFFIX}") if (output_dir / name).is_dir() else ():
            stray.unlink()
        if (output_dir / name).is_dir() and not any((output_dir / name).iterdir()):
            (output_dir / name).rmdir()


def finished_files(output_dir: Path) -> set[str]:
    """Images the manifest lists whose files (and masks) are in place."""
    return {entry.file_name for entry in read_manifest(output_dir)
            if (output_dir / entry.file_name).is_file()
            and (not entry.mask_file_name or (output_dir / entry.mask_file_name).is_file())}


def write_array_png(array: np.ndarray, target: Path) -> str:
    """A uint8 (H, W) or (H, W, 3) array as PNG, written under a temporary name and renamed into place; returns
    the file's SHA-256 for the manifest."""
    from PIL import Image

    partial = partial_path(target)
    Image.fromarray(array).save(partial, format="PNG")
    digest = file_sha256(partial)
    os.replace(partial, target)
    return digest


def write_metadata(output_dir: Path) -> Path:
    """metadata.csv from the manifest: one row per image (the last line wins), split train; mask_file_name,
    text and label columns where any image has one."""
    import pandas as pd

    entries = {entry.file_name: entry for entry in read_manifest(output_dir)}
    rows = [{"file_name": name, "mask_file_name": entry.mask_file_name, "text": entry.extra.get("text", ""),
             "label": entry.extra.get("label", ""), "split": "train"}
            for name, entry in sorted(entries.items())]
    table = pd.DataFrame(rows, columns=["file_name", "mask_file_name", "text", "label", "split"])
    table = table[[column for column in table.columns
                   if column in ("file_name", "split") or table[column].astype(bool).any()]]
    write_text_atomic(output_dir / "metadata.csv", table.to_csv(index=False))
    return output_dir / "metadata.csv"
