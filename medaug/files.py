"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A killed process leaves the old file or the new one, never half of either, so a reader (a resumed run, a
report, a second process) can trust what it opens.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


# Weight files that only unpickling reads; medaug loads safetensors only and refuses these by name.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickled_files(folder: Path) -> list[str]:
    """Names of pickle weight files in `folder` (not below it)."""
    return sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []


def safetensors_problem(path: Path) -> str | None:
    """Why `path` does not read as a safetensors file (only its header and length are checked, nothing is
    loaded), or None if it does."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except (SafetensorError, OSError) as error:
        return f"not a readable safetensors file ({error})"


def partial_path(target: Path) -> Path:
    """The temporary name `target` is written under before it is renamed into place."""
    return target.with_name(f".{target.name}.partial")


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def plain_json(value):
    """JSON-ready: numpy scalars become numbers, tuples lists, paths strings, NaN and infinity null (readers
    treat null as NaN)."""
    if isinstance(value, dict):
        return {str(key): plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, payload, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(plain_json(payload), indent=indent, allow_nan=False) + "\n")
