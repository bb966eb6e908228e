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
    assert "[console_scripts]" in text and "medaug = medaug.cli:main" in text


def imported_top_level_modules() -> dict[str, str]:
    """{module: a file importing it} for every absolute import in the installed code and the training scripts."""
    import ast

    found = {}
    for folder in ("medaug", "pipelines", "segmentation", "train_scripts"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO_ROOT)))
    return found


def declared_requirements(wheel, wheel_names) -> set[str]:
    import re

    (metadata,) = [name for name in wheel_names if name.endswith(".dist-info/METADATA")]
    lines = wheel.read(metadata).decode().splitlines()
    return {re.split(r"[ <>=!;\[(~]", line.split(":", 1)[1].strip())[0].lower().replace("_", "-")
            for line in lines if line.startswith("Requires-Dist:")}


def test_every_imported_package_is_declared(wheel, wheel_names):
    """A module the code imports comes from a distribution the wheel requires (directly or as an extra)."""
    from importlib.metadata import packages_distributions

    own = {"medaug", "pipelines", "segmentation", "tests", "finetune"}
    distributions = packages_distributions()
    declared = declared_requirements(wheel, wheel_names)
    undeclared = {}
    for module, where in imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module in own:
            continue
        # A module of no installed distribution (xformers here) must be a declared name itself.
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = where
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"
    assert {"timm", "tensorboard", "pyarrow", "transformers", "peft"} <= declared


def test_every_source_module_is_in_the_wheel(wheel_names):
    """A package folder left out of pyproject's explicit list would import from a checkout and be missing from an
    installed wheel."""
    root = REPO_ROOT
    folders = {"medaug": "medaug", "pipelines": "medaug/pipelines", "segmentation": "medaug/segmentation",
               "train_scripts": "medaug/scripts"}
    expected = {f"{installed}/{path.relative_to(root / source).as_posix()}"
                for source, installed in folders.items() for path in (root / source).rglob("*.py")}
    assert expected - wheel_names == set()
