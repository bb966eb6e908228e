"""benchmarks/generate_throughput.py: both arms run on the same model and images and the ratio is theirs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("generate_throughput",
                                              REPO_ROOT / "benchmarks" / "generate_throughput.py")
generate_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate_throughput)


def test_smoke_run_measures_both_arms_with_and_without_controlnet(tmp_path, one_torch_thread):
    output = tmp_path / "result.json"
    generate_throughput.main(["--presets", "tiny", "--images", "3", "--steps", "2", "--batch_size", "2",
                              "--output", str(output)])
    result = json.loads(output.read_text())
    arms = result["presets"]["tiny"]
    assert set(arms) == {"resolution", "no_controlnet", "controlnet"}
    for label in ("no_controlnet", "controlnet"):
        medaug, stock = arms[label]["medaug"], arms[label]["stock"]
        assert medaug["images"] == stock["images"] == 3
        assert medaug["images_per_second"] > 0 and stock["images_per_second"] > 0
        assert arms[label]["ratio"] == pytest.approx(medaug["images_per_second"] / stock["images_per_second"])
