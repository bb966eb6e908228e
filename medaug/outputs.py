"""Output folders: checked before any work, and written by one run at a time.

`writable_folder` makes the folder and proves it can hold a file, so a training run that would fail on save
fails before its first step instead. `output_lock` holds `.medaug.lock` in the folder for as long as a run
writes there: an advisory `flock`, which the kernel releases when the process ends however it ends, so a
killed run never leaves a lock that blocks the next one. The file names who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".medaug.lock"


class OutputFolderError(ValueError):
    """An output folder cannot be used; the message names the flag and the folder."""


def writable_folder(path: str | Path, flag: str = "--output_dir") -> Path:
    """Create `path` (and its parents) if needed and check a file can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{flag}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFolderError(f"{flag}: {path} cannot be created ({error.strerror or error})") from None
    probe = path / f".medaug-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputFolderError(f"{flag}: {path} is not writable ({error.strerror or error})") from None
    return path


def folder_entries(path: Path) -> list[Path]:
    """What a folder holds besides the lock of the run writing it."""
    return [entry for entry in path.iterdir() if entry.name != LOCK_NAME] if path.is_dir() else []


def refuse_input_folder(output_dir: str | Path,
                        inputs: dict[str, str | Path | None] | Iterable[tuple[str, str | Path | None]],
                        flag: str = "--output_dir") -> None:
    """medaug never writes into a folder it reads: an output folder that is one of the command's input folders
    (resolved, so no spelling of the path gets through) is refused, whatever --overwrite says. `inputs`: {flag:
    folder}, or (flag, folder) pairs where a flag is given more than once."""
    output = Path(output_dir).expanduser().resolve()
    for input_flag, path in inputs.items() if isinstance(inputs, dict) else inputs:
        if path is not None and str(path) and Path(path).expanduser().resolve() == output:
            raise OutputFolderError(f"{flag}: {output_dir} is the {input_flag} folder; medaug never writes into "
                                    "a folder it reads, choose another one")


def refuse_foreign_entries(output_dir: str | Path, what: str, ours: Callable[[Path], bool] | None = None,
                           flag: str = "--output_dir") -> None:
    """Refuse a folder holding anything `ours` does not recognise as `what`'s own output (without `ours`: a folder
    that is not empty): medaug deletes or replaces only what it can prove it wrote, so it never works in a folder
    of the user's files."""
    foreign = sorted(entry.name for entry in folder_entries(Path(output_dir)) if ours is None or not ours(entry))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputFolderError(f"{flag}: {output_dir} holds {shown}, which {what} did not write; medaug replaces "
                                "only its own output, so choose a new or empty folder")


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "a process that has not said who it is"


def _acquire(path: Path, flag: str):
    """An open lock file this process holds the lock of; a lock file another process removed while this one
    waited on it (it released the folder) is opened again, so two runs never hold two different files."""
    lock_path = path / LOCK_NAME
    for _ in range(10):
        handle = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise OutputFolderError(f"{flag}: {path} is in use by another run ({holder}); wait for it to finish "
                                    "or choose another folder") from None
        try:
            same_file = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle
        handle.close()
    raise OutputFolderError(f"{flag}: {path}: could not take {LOCK_NAME} (other runs keep taking it)")


@contextmanager
def output_lock(path: str | Path, flag: str = "--output_dir", enabled: bool = True) -> Iterator[Path]:
    """Hold `path` for this run: refused with the holder's pid, host and command while another run holds it.

    `enabled=False` (the non-main processes of one `accelerate launch`, which share their main process's
    folder) only checks the folder is writable. Folders made here and left empty (a run refused before it
    wrote anything) are removed again."""
    path = Path(path)
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    writable_folder(path, flag)
    if not enabled:
        yield path
        return
    handle = _acquire(path, flag)
    try:
        handle.seek(0)
        handle.truncate()
        command = " ".join(Path(sys.argv[0]).name if i == 0 else arg for i, arg in enumerate(sys.argv))[:300]
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n")
        handle.flush()
        yield path
    finally:
        try:
            os.unlink(path / LOCK_NAME)  # while still holding it: see _acquire
        except FileNotFoundError:
            pass
        handle.close()
        _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
