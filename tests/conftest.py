"""Shared fixtures: a tiny from-scratch Stable Diffusion folder, a phantom dataset, the real datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub, and must not try
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("MEDAUG_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """Path of a real dataset beside the checkout, or skip the test saying where it was looked for."""
    path = SHARED_DATASETS / name
    if not (path / "metadata.csv").is_file():
        pytest.skip(f"real dataset not found at {path} (set MEDAUG_SHARED_DATASETS to its parent folder)")
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state that refuses a second mixed precision: every test starts afresh, as
    every `accelerate launch` does."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_torch_thread():
    """Two torch threads on a busy 2-core machine run several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A `tiny` preset model written by init-model, as scripts receive a real base model's folder."""
    from medaug.models import init_model

    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    init_model(path, preset="tiny", prompts=["breast ultrasound, benign lesion"], seed=0)
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from medaug.data import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("data") / "phantom", num_images=20, size=80, seed=0)


@pytest.fixture
def write_dataset(tmp_path):
    """Write a dataset folder from metadata rows; files are made by the test itself."""

    def write(rows: list[dict], name: str = "metadata.csv") -> Path:
        table = pd.DataFrame(rows)
        if name.endswith(".csv"):
            table.to_csv(tmp_path / name, index=False)
        else:
            table.to_json(tmp_path / name, orient="records", lines=True)
        return tmp_path

    return write
