"""The wheel installs `medaug` with `pipelines/` and `segmentation/` under it, and nothing at top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    target = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
               "--wheel-dir", str(target), str(REPO_ROOT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"building a wheel needs setuptools and wheel in this environment: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    (path,) = target.glob("medaug-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


@pytest.fixture(scope="module")
def wheel_names(wheel) -> set[str]:
    return set(wheel.namelist())


def test_wheel_maps_pipelines_and_segmentation_under_medaug(wheel_names):
    assert "medaug/pipelines/__init__.py" in wheel_names
    assert "medaug/segmentation/__init__.py" in wheel_names
    assert "medaug/data/folder.py" in wheel_names and "medaug/cli.py" in wheel_names
    # generation loads output folders through medaug.training (LoRA file names, file identities)
    assert {"medaug/pipelines/medaug_controlnet_pipeline.py", "medaug/generate.py",
            "medaug/training/lora.py"} <= wheel_names


def test_wheel_installs_no_foreign_top_level_names(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names}
    assert {name for name in top_level if not name.startswith("medaug")} == set()
    assert not any(name.startswith(("pipelines/", "segmentation/", "tests/", "train_scripts/")) for name in wheel_names)


def test_wheel_declares_the_medaug_command(wheel, wheel_names):
    (entry_points,) = [name for name in wheel_names if name.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[console_scripts]" in text and "medaug = medaug.cli:app" in text
