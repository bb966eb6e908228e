"""Speed benchmarks in benchmarks/: each runs end to end at a tiny size, and the baseline loop really trains."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_throughput_runs_both_arms_and_writes_positive_figures(phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the arms are subprocesses
    bench = load_benchmark("train_throughput")
    output = tmp_path / "throughput.json"
    bench.main(["--presets", "tiny", "--steps", "2", "--batch_size", "2", "--data", str(phantom_dir),
                "--device", "cpu", "--repeats", "1", "--output", str(output)])
    results = json.loads(output.read_text())
    assert results["data"] == str(phantom_dir) and results["device"] == "cpu"
    row = results["presets"]["tiny"]
    assert (row["resolution"], row["steps"], row["batch_size"], row["rank"]) == (64, 2, 2, 4)
    for arm in ("finetune", "finetune_fp32", "baseline"):
        figures = row[arm]
        for key in ("images_per_second", "steps_per_second", "train_seconds", "setup_seconds", "peak_rss_mib"):
            assert figures[key] > 0, (arm, key)
        assert len(figures["losses"]) == 2 and all(math.isfinite(loss) for loss in figures["losses"])
        assert figures["images_per_second"] == pytest.approx(2 * figures["steps_per_second"])
        assert figures["images_per_second_runs"] == [figures["images_per_second"]] and len(figures["runs"]) == 1
    assert row["finetune"]["cache_computed"] == ["latents", "text-features"]  # a cold cache, filled and timed
    assert row["finetune"]["cache_fill_seconds"] > 0 and row["baseline"]["cache_fill_seconds"] == 0
    assert row["ratio_finetune_vs_baseline"] == results["ratio"]["tiny"] == pytest.approx(
        row["finetune"]["images_per_second"] / row["baseline"]["images_per_second"])
    assert row["finetune_fp32"]["runs"][0]["precision"] == "no" and row["finetune"]["runs"][0]["precision"] == "auto"
    assert all(math.isfinite(row[arm]["late_loss"]) for arm in ("finetune", "finetune_fp32", "baseline"))


def test_baseline_loop_trains_only_its_lora_parameters(tiny_model_dir, phantom_dir):
    bench = load_benchmark("train_throughput")
    torch.manual_seed(0)
    parts = bench.load_baseline(tiny_model_dir, rank=4, device="cpu")
    unet = parts["unet"]
    lora = {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_" in name}
    frozen = {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_" not in name}
    assert lora and all(not torch.any(value) for name, value in lora.items() if "lora_B" in name)
    loader = bench.baseline_loader(parts, phantom_dir, num_rows=4, batch_size=2, seed=0)

    result = bench.train_baseline(parts, loader, steps=3, learning_rate=1e-3)

    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["trainable_parameters"] == sum(value.numel() for value in lora.values())
    after = dict(unet.named_parameters())
    assert all(torch.any(after[name] != value) for name, value in lora.items() if "lora_B" in name)
    assert all(torch.equal(after[name], value) for name, value in frozen.items())


def test_sd15_configuration_has_the_published_parameter_counts():
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = load_benchmark("gpu_sd15").SD15
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        unet = UNet2DConditionModel(**config["unet"])
        models = {"unet": unet, "vae": AutoencoderKL(**config["vae"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
                  "controlnet": ControlNetModel.from_unet(unet, **config["controlnet"])}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    # runwayml/stable-diffusion-v1-5 and lllyasviel/sd-controlnet-canny as published
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "controlnet": 361_279_120}


def test_gpu_sd15_smoke_runs_every_path_and_labels_itself(tmp_path, capsys):
    output = tmp_path / "gpu.json"
    results = load_benchmark("gpu_sd15").main(["--smoke", "--peak_tflops", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(results, default=str))
    assert results["smoke"] and "measures nothing" in results["note"] and results["dtype"] == "float32"
    assert "SMOKE RUN" in capsys.readouterr().out
    rows = {(row["task"].split()[0], row["attention"], row["compiled"]): row for row in results["rows"]}
    assert set(rows) == {(task, attention, compiled) for task in ("train", "ControlNet")
                         for attention, compiled in (("sdpa", False), ("xformers", False), ("sdpa", True))}
    for (task, attention, compiled), row in rows.items():
        if attention == "xformers" and importlib.util.find_spec("xformers") is None:
            assert row["status"] == "not installed" and row["images_per_second"] is None
            continue
        assert row["status"] == "ok", row
        assert row["images_per_second"] > 0 and row["flops_per_iteration"] > 0
        assert row["mfu"] == pytest.approx(row["flops_per_iteration"] / row["seconds_per_iteration"] / 1e12)
        assert (row["compile_seconds"] is not None) == compiled


def test_gpu_sd15_without_cuda_says_so_and_exits_0(tmp_path):
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_sd15.py"), "--output", str(tmp_path / "g.json")],
                               env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "no CUDA device here, so nothing was measured" in completed.stdout
    assert not (tmp_path / "g.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sd15_measures_sd15_training_and_generation_on_cuda(tmp_path):
    bench = load_benchmark("gpu_sd15")
    results = bench.main(["--train_batch", "2", "--steps", "2", "--warmup", "1", "--gen_batch", "1",
                          "--inference_steps", "4", "--gen_repeats", "1", "--no_compile",
                          "--output", str(tmp_path / "gpu.json")])
    assert not results["smoke"] and results["dtype"] == "bfloat16" and results["resolution"] == 512
    for row in results["rows"]:
        if row["status"] == "not installed":
            continue
        assert row["status"] == "ok" and row["images_per_second"] > 0 and row["peak_memory_gib"] > 1
        if results["peak_tflops"]:
            assert 0 < row["mfu"] < 1


def test_repeated_runs_report_medians_the_largest_peak_memory_and_every_run():
    bench = load_benchmark("train_throughput")
    runs = [{"images_per_second": ips, "steps_per_second": ips / 4, "train_seconds": 4 / ips, "setup_seconds": 1.0,
             "cache_fill_seconds": fill, "peak_rss_mib": rss, "resolution": 64, "losses": [1.0]}
            for ips, fill, rss in ((8.0, 2.0, 900.0), (2.0, 9.0, 1200.0), (6.0, 3.0, 1000.0))]
    summary = bench.summarise_runs(runs)
    assert (summary["images_per_second"], summary["steps_per_second"], summary["cache_fill_seconds"]) == (6.0, 1.5, 3.0)
    assert summary["peak_rss_mib"] == 1200.0 and summary["images_per_second_runs"] == [8.0, 2.0, 6.0]
    assert summary["runs"] == runs and summary["resolution"] == 64


def test_cpu_kernels_times_every_variant_against_fp32_in_one_run(tmp_path):
    bench = load_benchmark("cpu_kernels")
    output = tmp_path / "kernels.json"
    results = bench.main(["--preset", "tiny", "--repeats", "1", "--output", str(output)])
    assert json.loads(output.read_text())["ratio"] == results["ratio"]
    assert set(results["sampling_batch_16"]) == {"fp32", "bf16 autocast", "fp32 channels-last",
                                                 "bf16 autocast, channels-last"}
    assert set(results["lora_training_step_batch_4"]) == {
        "fp32", "bf16 autocast, fp32 frozen weights", "bf16 autocast, bf16 frozen weights",
        "bf16, bf16 frozen, matmul-backward attention"}
    for block in ("sampling_batch_16", "lora_training_step_batch_4"):
        assert results["ratio"][f"{block}: fp32"] == 1.0
        assert all(row["median_ms"] > 0 and row["first_call_s"] > 0 for row in results[block].values())


def test_generate_options_sweeps_batch_sizes_against_a_baseline_batch(tmp_path, one_torch_thread):
    bench = load_benchmark("generate_options")
    output = tmp_path / "options.json"
    results = bench.main(["--preset", "tiny", "--images", "3", "--batch_sizes", "1,2", "--baseline_batch", "2",
                          "--repeats", "2", "--output", str(output)])
    assert json.loads(output.read_text())["ratio"] == results["ratio"]
    rows = results["batch_sizes"]
    assert set(rows) == {"1", "2", "auto"} and all(row["images"] == 3 for row in rows.values())
    assert [rows[name]["batch_size"] for name in ("1", "2")] == [1, 2] and rows["auto"]["batch_size"] >= 1
    assert all(len(row["images_per_second_runs"]) == 2 for row in rows.values())
    assert results["ratio"]["batch 2"] == 1.0 and results["ratio"]["batch 1"] > 0
    assert rows["1"]["first_batch_seconds"] < rows["1"]["seconds"] and rows["1"]["steady_images_per_second"] > 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch_sizes", "1,2", "--baseline_batch", "4"])
