"""`medaug bench` and the study behind it: a tiny study writes every output, resumes, and refuses bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import ManifestEntry, append_manifest, make_phantom_dataset
from medaug.data.manifest import file_sha256
from medaug.segmentation.inputs import load_study_data
from medaug.segmentation.study import Run, StudyError, plan_runs, real_subset, run_study, synthetic_sample
from tests.test_report import coloured_pixels, screenshot

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory, phantom_dir):
    """A synthetic folder as generation writes it: all train rows, each traced to a real training source."""
    folder = make_phantom_dataset(tmp_path_factory.mktemp("synthetic") / "syn", num_images=12, size=80, seed=1)
    table = pd.read_csv(folder / "metadata.csv")
    table["split"] = "train"
    table.to_csv(folder / "metadata.csv", index=False)
    source = pd.read_csv(phantom_dir / "metadata.csv").query("split == 'train'").file_name.iloc[0]
    for name, mask in zip(table.file_name, table.mask_file_name):
        append_manifest(folder, ManifestEntry(file_name=name, seed=0, model_dir="model", mask_file_name=mask,
                                              source_dataset=str(phantom_dir), source_file_name=source,
                                              source_split="train", sha256=file_sha256(folder / name),
                                              mask_sha256=file_sha256(folder / mask)))
    return folder


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_plan_covers_every_arm_ratio_fraction_and_seed():
    runs = plan_runs(["real", "real+synthetic", "synthetic", "real+classical"], [0.25, 1.0], [0.5, 2.0], seeds=2)
    assert len(runs) == 2 * (1 + 2 * (1 + 2 + 1))
    assert runs[0] == Run("synthetic", 0.0, 0.0, 0) and runs[-1] == Run("real+classical", 1.0, 0.0, 1)
    assert len({run.run_id for run in runs}) == len(runs)


def test_subsets_are_stratified_seeded_and_nested(phantom_dir):
    train = load_study_data("cls", phantom_dir, check_images=False).train
    quarter = real_subset(train, 0.25, seed=0)
    half = real_subset(train, 0.5, seed=0)
    assert {item["label_name"] for item in quarter} == {"round", "irregular"}
    assert {item["file_name"] for item in quarter} <= {item["file_name"] for item in half}
    assert [i["file_name"] for i in quarter] != [i["file_name"] for i in real_subset(train, 0.25, seed=1)]
    assert synthetic_sample(train, 3, seed=0) == synthetic_sample(train, 6, seed=0)[:3]


def test_a_tiny_study_writes_every_output_then_resumes_only_unfinished_runs(phantom_dir, synthetic_dir, tmp_path):
    output = tmp_path / "study"
    events: list[str] = []
    settings = dict(synthetic_dirs=[synthetic_dir], arms=["real", "real+synthetic"], synthetic_ratios=[0.5],
                    seeds=1, steps=6, resolution=32, batch_size=4, device="cpu",
                    on_progress=lambda done, total, text: events.append(text))
    summary = run_study("seg", phantom_dir, output, **settings)

    for name in ("study.json", "results.json", "results.md", "dice_vs_ratio.png", "iou_vs_ratio.png",
                 "hd95_vs_ratio.png", "runs/real_f1_r0_s0/result.json", "runs/real-synthetic_f1_r0.5_s0/result.json"):
        assert (output / name).is_file(), name
    written = json.loads((output / "results.json").read_text())
    assert written["settings"]["steps"] == 6 and len(written["runs"]) == 2
    assert [run["steps"] for run in written["runs"]] == [6, 6]  # 14 and 21 images: the same updates
    real, mixed = written["groups"]
    assert real["metrics"]["dice"]["mean"] == pytest.approx(summary["groups"][0]["metrics"]["dice"]["mean"])
    assert (real["arm"], mixed["arm"], mixed["n_train_real"], mixed["n_train_synthetic"]) == \
        ("real", "real+synthetic", 14, 7)
    assert 0.0 <= real["metrics"]["dice"]["mean"] <= 1.0 and real["metrics"]["dice"]["values"] != [None]
    assert mixed["paired_vs_real"]["dice"]["n_pairs"] == 4 and real["paired_vs_real"] == {}
    run = json.loads((output / "runs/real_f1_r0_s0/result.json").read_text())
    assert run["history"]["steps"] == 6 and len(run["history"]["train_loss"]) == 6
    assert run["history"]["val_steps"] == list(range(1, 7)) and len(run["per_image"]["dice"]) == 4
    table = (output / "results.md").read_text()
    assert "| real+synthetic | 1 | 0.5 | 14 + 7 | 1 |" in table and "Δ Dice" in table
    assert Image.open(output / "dice_vs_ratio.png").size[0] > 100
    assert any("step 6/6" in text for text in events)
    for score in (real["metrics"]["dice"], real["metrics"]["hd95"], mixed["paired_vs_real"]["dice"]):
        assert score["ci_low"] <= score["ci_high"] and "seeds and test images" in score["ci_method"]
    assert 0.0 <= real["metrics"]["dice"]["ci_low"] <= real["metrics"]["dice"]["mean"] <= \
        real["metrics"]["dice"]["ci_high"] <= 1.0
    assert mixed["paired_vs_real"]["dice"]["verdict"] in ("better", "worse", "no clear difference")
    assert " ± " not in table and "percentile bootstrap" in table
    assert "Real-only at 1: validation Dice levelled at step" in table
    assert 1 <= written["learning_curve"][0]["plateau_step"] <= 6
    check_report_html(output, tmp_path)

    # as if killed during the second run: its result was never written
    (output / "runs/real-synthetic_f1_r0.5_s0/result.json").unlink()
    finished = (output / "runs/real_f1_r0_s0/result.json").stat().st_mtime_ns
    events.clear()
    again = run_study("seg", phantom_dir, output, **settings)
    trained = {text.split()[2] for text in events if " step " in text}
    assert trained == {"real-synthetic_f1_r0.5_s0"}
    assert (output / "runs/real_f1_r0_s0/result.json").stat().st_mtime_ns == finished
    assert again["groups"][0]["metrics"]["dice"]["values"] == summary["groups"][0]["metrics"]["dice"]["values"]

    with pytest.raises(StudyError, match=r"steps \(was 6, now 7\)"):
        run_study("seg", phantom_dir, output, **{**settings, "steps": 7})
    fewer = tmp_path / "fewer"
    shutil.copytree(synthetic_dir, fewer)
    pd.read_csv(fewer / "metadata.csv").head(10).to_csv(fewer / "metadata.csv", index=False)
    with pytest.raises(StudyError, match=r"images \(was .*'synthetic': 12.*now .*'synthetic': 10"):
        run_study("seg", phantom_dir, output, **{**settings, "synthetic_dirs": [fewer]})


def test_bench_cls_from_the_command_line_saves_scores_and_gradcam(phantom_dir, tmp_path):
    output = tmp_path / "cls"
    result = invoke("bench", "cls", "--data", phantom_dir, "--output_dir", output, "--network", "resnet18",
                    "--arms", "real+classical", "--seeds", 1, "--steps", 3, "--resolution", 32, "--batch_size", 4,
                    "--gradcam_images", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "results.json").read_text())
    assert summary["classes"] == ["irregular", "round"] and summary["primary_metric"] == "auc"
    scores = summary["groups"][0]["metrics"]
    assert 0.0 <= scores["accuracy"]["mean"] <= 1.0 and 0.0 <= scores["macro_f1"]["mean"] <= 1.0
    maps = sorted((output / "runs/real-classical_f1_r0_s0/gradcam").glob("*.png"))
    assert len(maps) == 2 and np.asarray(Image.open(maps[0])).shape == (32, 32, 3)
    assert "AUC" in (output / "results.md").read_text()


def test_densenet121_gradcam_maps_are_written(phantom_dir, tmp_path):
    from medaug.segmentation.common import evaluation_batches
    from medaug.segmentation.networks import build_network
    from medaug.segmentation.train_cls import save_gradcam

    data = load_study_data("cls", phantom_dir, check_images=False)
    batches = evaluation_batches(data.test, 32, 1, "pad", with_masks=False, batch_size=2)
    torch.manual_seed(0)
    model = build_network("cls", "densenet121", 1, 2)
    paths = save_gradcam(model, "densenet121", batches, data.classes, tmp_path / "cam", 3, "cpu")
    assert len(paths) == 3 and all(path.is_file() for path in paths)
    assert "_true-" in paths[0].name and "_pred-" in paths[0].name


@pytest.mark.parametrize("flags, message", [
    (["--arms", "real,real+synthetic"], "--arms: real+synthetic need synthetic images; pass --synthetic"),
    (["--synthetic_ratios", "one,two"], "--synthetic_ratios: expected comma-separated numbers"),
    (["--real_fractions", "0,1"], "--real_fractions: each must be in (0, 1]"),
    (["--arms", "real,mixup"], "--arms: unknown or no seg arm(s) ['mixup']"),
    (["--network", "vnet"], "--network: unknown seg network 'vnet'"),
    (["--resolution", 40], "--resolution: network 'unet' needs a multiple of 16 px, got 40"),
])
def test_bad_flags_fail_before_training_naming_the_flag(phantom_dir, tmp_path, flags, message):
    result = invoke("bench", "seg", "--data", phantom_dir, "--output_dir", tmp_path / "out", *flags)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out" / "runs").exists()


def test_leaking_synthetic_folder_is_refused_by_the_command(phantom_dir, synthetic_dir, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(synthetic_dir, leaky)
    test_file = pd.read_csv(phantom_dir / "metadata.csv").query("split == 'test'").file_name.iloc[0]
    append_manifest(leaky, ManifestEntry(file_name="images/round_0000.png", seed=0, model_dir="model",
                                         source_dataset=str(phantom_dir), source_file_name=test_file,
                                         source_split="test"))
    result = invoke("bench", "seg", "--data", phantom_dir, "--synthetic", leaky, "--output_dir", tmp_path / "out")
    assert result.exit_code == 2
    assert f"generated from test-split source '{test_file}'" in " ".join(result.output.split())



def test_every_spelling_of_a_test_source_is_caught(phantom_dir, synthetic_dir, tmp_path):
    """The leakage guard compares identities: split and file name after normalisation, and the source's bytes."""
    from medaug.segmentation.inputs import StudyError, load_study_data

    table = pd.read_csv(phantom_dir / "metadata.csv")
    test_file = table.query("split == 'test'").file_name.iloc[0]
    train_file = table.query("split == 'train'").file_name.iloc[0]
    renamed = tmp_path / "elsewhere"  # the test image under another name in another folder
    renamed.mkdir()
    shutil.copy(phantom_dir / test_file, renamed / "copy.png")
    spellings = [dict(source_split="Test"), dict(source_split=" TEST "),
                 dict(source_split="train", source_file_name="./" + test_file.upper()),
                 dict(source_split="train", source_file_name=test_file.replace("/", "\\")),
                 dict(source_split="train", source_dataset=str(renamed), source_file_name="copy.png",
                      source_sha256=file_sha256(renamed / "copy.png"))]
    for number, spelling in enumerate(spellings):
        leaky = tmp_path / f"leaky{number}"
        shutil.copytree(synthetic_dir, leaky)
        entry = dict(source_dataset=str(phantom_dir), source_file_name=test_file) | spelling
        append_manifest(leaky, ManifestEntry(file_name="images/round_0000.png", seed=0, model_dir="model", **entry))
        with pytest.raises(StudyError, match="generated from test-split source"):
            load_study_data("seg", phantom_dir, [leaky], check_images=False)
    honest = tmp_path / "honest"  # a training source, however spelled, passes
    shutil.copytree(synthetic_dir, honest)
    append_manifest(honest, ManifestEntry(file_name="images/round_0000.png", seed=0, model_dir="model",
                                          source_dataset=str(phantom_dir), source_file_name=" " + train_file,
                                          source_split="Train", source_sha256=file_sha256(phantom_dir / train_file)))
    load_study_data("seg", phantom_dir, [honest], check_images=False, allow_unknown_provenance=True)


def check_report_html(output, tmp_path):
    """report.html is self-contained and shows each arm's predicted masks (cyan) over the truth (red) in Chromium."""
    text = (output / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    predictions = np.load(output / "runs/real_f1_r0_s0/overlay_predictions.npz")
    shown = len(predictions["file_names"])
    assert shown == 4 and predictions["masks"].shape == (4, 32, 32)
    plots = json.loads((output / "results.json").read_text())["plots"]
    assert len(plots) == 4 and len(sources) == 4 + 2 * shown  # plots, then each arm's overlays on the same images
    assert all(source.startswith("data:image/png;base64,") for source in sources) and "href=" not in text
    pixels = screenshot(output / "report.html", tmp_path / "bench.png")
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', text))
    control = screenshot(blank, tmp_path / "blank.png")
    red, cyan = (255, 38, 38), (26, 230, 230)
    assert coloured_pixels(pixels, red) > 100 and coloured_pixels(control, red) == 0
    assert coloured_pixels(pixels, cyan) > 20 or not predictions["masks"].any(), "predicted outlines do not show"
