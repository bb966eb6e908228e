"""`manifest.jsonl` of a synthetic folder: where each generated image came from.

One JSON object a line. A synthetic folder is also an ordinary dataset folder (its `metadata.csv` lists the
images), and the manifest adds provenance: which real row gave the structure or condition (so benchmarks
can refuse synthetic images made from test-split sources), the seed, the prompt or condition hash, and the
model folder. Lines are appended whole and flushed, so a killed run leaves at most one unreadable last line,
which `read_manifest` ignores.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medaug.records import checked_fields

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class ManifestEntry:
    file_name: str  # the generated image, relative to the synthetic folder
    seed: int
    model_dir: str
    mask_file_name: str = ""  # the mask it was generated for, relative to the synthetic folder
    source_dataset: str = ""  # the real dataset folder that gave structure or condition
    source_file_name: str = ""  # that row's file_name in the source dataset
    source_split: str = ""  # that row's split, so leakage into a test split can be refused
    source_sha256: str = ""  # of that row's image file: the source's identity, whatever its name is spelled as
    prompt: str = ""
    condition_hash: str = ""  # hash of a non-text condition (embedding, reference image, edge map)
    sha256: str = ""  # of the image file as written, so a row whose file was swapped or copied in is caught
    mask_sha256: str = ""  # of the mask file as written
    extra: dict = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as manifest lines record them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> list[ManifestEntry]:
    """Entries of a synthetic folder's manifest ([] if there is none); a torn last line is skipped."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # written while the run was killed
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        entries.append(ManifestEntry(**checked_fields(record, ManifestEntry, f"{path}: line {number}")))
    return entries


def append_manifest(folder: str | Path, entry: ManifestEntry) -> None:
    """Append one entry as a single line, in one write to a file opened with O_APPEND (so processes writing to
    the same manifest never interleave within a line), and flush it to disk."""
    path = Path(folder) / MANIFEST_NAME
    line = (json.dumps(asdict(entry), ensure_ascii=False) + "\n").encode("utf-8")
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(handle, line)
        os.fsync(handle)
    finally:
        os.close(handle)


def drop_torn_line(folder: str | Path) -> bool:
    """Cut a last line that a killed run left unfinished (no newline), so later appends start on a fresh line;
    True if one was cut. Call it before appending to a manifest that may come from an interrupted run."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with open(path, "r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)
    return True
