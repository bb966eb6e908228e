"""On-disk caches of what frozen models compute (VAE latents, condition features), keyed by everything
that determines them, so a second run reuses them and any change (model weights, resolution, data) misses."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

DEFAULT_CACHE_DIR = Path(os.environ.get("MEDAUG_CACHE", Path.home() / ".cache" / "medaug"))


def file_identity(path: str | Path) -> str:
    """Path, size and modification time: changes whenever the file is replaced or edited."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def folder_identity(folder: str | Path) -> str:
    """Identity of a model folder: every file's identity (configs and weights); a single file's own identity."""
    folder = Path(folder)
    if folder.is_file():
        return file_identity(folder)
    if not folder.is_dir():
        return str(folder)  # a Hub name: its revision is part of the name
    return ";".join(file_identity(path) for path in sorted(folder.rglob("*")) if path.is_file())


def fingerprint(parts: dict) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class TensorCache:
    """Named groups of tensors stored as safetensors files whose names carry the fingerprint of their inputs."""

    def __init__(self, cache_dir: str | Path = DEFAULT_CACHE_DIR):
        self.cache_dir = Path(cache_dir)
        self.computed: list[str] = []  # names computed (not read) by this object, for logs and tests

    def path(self, name: str, key_parts: dict) -> Path:
        return self.cache_dir / f"{name}-{fingerprint(key_parts)}.safetensors"

    def load_or_compute(
        self, name: str, key_parts: dict, compute: Callable[[], dict[str, torch.Tensor]], write: bool = True
    ) -> dict[str, torch.Tensor]:
        """Read the cached tensors for these inputs, or compute them and (with `write`) store them atomically."""
        from safetensors.torch import load_file, save_file

        path = self.path(name, key_parts)
        if path.is_file():
            return load_file(str(path))
        tensors = {key: value.detach().cpu().contiguous() for key, value in compute().items()}
        self.computed.append(name)
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            save_file(tensors, str(partial))
            os.replace(partial, path)
        return tensors
