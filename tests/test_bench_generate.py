"""benchmarks/generate_throughput.py: both arms run on the same model and images and the ratio is theirs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO_ROOT

pytest_plugins = ["tests.model_folders"]  # the session's model_folder fixture

spec = importlib.util.spec_from_file_location("generate_throughput",
                                              REPO_ROOT / "benchmarks" / "generate_throughput.py")
generate_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate_throughput)


def test_smoke_run_measures_both_arms_with_and_without_controlnet(tmp_path, one_torch_thread):
    output = tmp_path / "result.json"
    generate_throughput.main(["--presets", "tiny", "--images", "3", "--stock_steps", "2", "--medaug_steps", "2",
                              "--batch_size", "2", "--repeats", "2", "--output", str(output)])
    result = json.loads(output.read_text())
    assert set(result["cases"]) == set(result["ratio"]) == {"tiny_no_controlnet", "tiny_controlnet"}
    assert "quality" not in result  # no --demo_dir: skipped, and the printout says so
    for case, row in result["cases"].items():
        medaug, stock = row["medaug"], row["stock"]
        assert [run["images"] for run in medaug["runs"] + stock["runs"]] == [3] * 4
        assert len(medaug["images_per_second_runs"]) == len(stock["images_per_second_runs"]) == 2
        assert medaug["spread"] == [min(medaug["images_per_second_runs"]), max(medaug["images_per_second_runs"])]
        assert row["ratio"] == result["ratio"][case] == pytest.approx(
            medaug["images_per_second"] / stock["images_per_second"])
        assert stock["precision"] == "fp32" and medaug["precision"] in ("fp32", "bf16")


def test_quality_check_compares_samplers_on_the_same_jobs_against_real_images(model_folder, phantom_dir, tmp_path,
                                                                              one_torch_thread):
    """A demo-like folder (a trained run, its data, a domain encoder): every sampler makes the same jobs, the
    reference is at distance 0 from itself, and the floor and bootstrap noise are reported."""
    from argparse import Namespace

    from medaug.metrics.encoder import load_training_images, train_encoder

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "finetune").symlink_to(model_folder())
    (demo / "data").symlink_to(phantom_dir)
    train_encoder(load_training_images(phantom_dir, "train", 1, 32, "pad", None), demo / "encoder",
                  max_train_steps=2, train_batch_size=8, seed=0)
    options = Namespace(stock_steps=2, medaug_steps=2, reference_steps=3, quality_per_source=1, real_images=40,
                        guidance_scale=3.0, seed=0)
    quality = generate_throughput.sampler_quality(demo, tmp_path / "work", options)
    samplers = quality["samplers"]
    assert len(samplers) == 5 and quality["synthetic_images"] == 14 and quality["real_images"] == 40
    reference = samplers[list(samplers)[-1]]
    assert reference["grey_levels_from_reference"] == 0 and reference["steps"] == 3
    assert all(row["images"] == 14 and row["frechet_distance"] > 0 for row in samplers.values())
    assert any(row["grey_levels_from_reference"] > 0 for row in samplers.values())
    assert samplers[list(samplers)[0]]["frechet_bootstrap_std"] > 0 and quality["real_vs_real_floor"] > 0
    assert isinstance(quality["equal_quality"], bool)
