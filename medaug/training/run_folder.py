"""A training script's hold on its output folder, taken before any work.

The folder must be a writable folder (checked now, not at the first save after hours of training), no other
run may be writing there (`medaug.outputs.output_lock`), and it may not hold another run: a finished run (its
run record) or an unfinished one (its checkpoints) is refused unless the script resumes it
(`--resume_from_checkpoint`) or replaces it (`--overwrite`, which removes what a training run writes and
nothing else).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medaug.outputs import OutputFolderError, output_lock, refuse_foreign_entries
from medaug.run_record import CARD_NAME, FAMILY_FOLDERS, RECORD_NAME
from medaug.training.checkpoint import check_checkpoint, list_checkpoints, resolve_checkpoint
from medaug.training.lora import LORA_WEIGHTS_NAME

# What a training run writes into its folder; --overwrite removes these and nothing else.
RUN_ENTRIES = (RECORD_NAME, CARD_NAME, LORA_WEIGHTS_NAME, "unet", "controlnet", "condition_encoder", *FAMILY_FOLDERS,
               "logs", "validation")


def first_process() -> bool:
    """Whether this is the first process of an `accelerate launch` (or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def _finished_run(output_dir: Path) -> str | None:
    """A short description of the finished run in the folder, or None if there is none."""
    path = output_dir / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return f"a finished {record.get('script', 'training')} run of {record.get('steps', '?')} steps"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "a finished run (its record is unreadable)"


def check_run_folder(output_dir: str | Path, resuming: bool, overwrite: bool) -> None:
    """Refuse a folder holding another run, or files of the user's and no run; with `overwrite`, remove that
    run's files first (and nothing else: the user's files beside a run are kept)."""
    output_dir = Path(output_dir)
    finished, checkpoints = _finished_run(output_dir), list_checkpoints(output_dir)
    if not finished and not checkpoints:  # no run here: the folder must hold nothing of the user's
        refuse_foreign_entries(output_dir, "a medaug training run", _written_by_a_run)
    if overwrite:
        remove_run(output_dir)
        return
    if resuming and (checkpoints or not finished):
        return
    if finished:
        advice = ("--resume_from_checkpoint latest to continue it, " if checkpoints else "")
        raise OutputFolderError(f"--output_dir: {output_dir} holds {finished}; pass {advice}--overwrite to replace "
                                "it, or choose another folder")
    if checkpoints:
        raise OutputFolderError(f"--output_dir: {output_dir} holds checkpoints of an unfinished run (up to "
                                f"{checkpoints[-1].name}); pass --resume_from_checkpoint latest to continue it, "
                                "--overwrite to start again, or choose another folder")


def _written_by_a_run(entry: Path) -> bool:
    """Whether a folder entry is something a training run writes; README.md only beside the run record that
    says a run finished here (a run writes both at its end), else it is the user's."""
    if entry.name == CARD_NAME:
        return (entry.parent / RECORD_NAME).is_file()
    return entry.name in RUN_ENTRIES or re.fullmatch(r"checkpoint-\d+(\.partial)?", entry.name) is not None


def remove_run(output_dir: Path) -> None:
    """Delete what a training run wrote in `output_dir` (its weights, record, logs and checkpoints)."""
    entries = [output_dir / name for name in RUN_ENTRIES] + list(output_dir.glob("checkpoint-*"))
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


@contextmanager
def claimed_run_folder(output_dir: str | Path, resume_from_checkpoint: str | None, overwrite: bool
                       ) -> Iterator[Path]:
    """Hold `output_dir` for a training run from before its first step until it has saved (see module doc)."""
    if resume_from_checkpoint and overwrite:
        raise OutputFolderError("--resume_from_checkpoint and --overwrite contradict each other; give one")
    first = first_process()
    with output_lock(output_dir, enabled=first) as path:
        if first or not overwrite:  # only the first process deletes; the others would see it half done
            check_run_folder(path, resuming=bool(resume_from_checkpoint), overwrite=overwrite and first)
        checkpoint = resolve_checkpoint(path, resume_from_checkpoint) if resume_from_checkpoint else None
        if checkpoint is not None:
            check_checkpoint(checkpoint)  # before the base loads and latents are encoded, not after
        yield path
