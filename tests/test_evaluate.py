"""`medaug evaluate` and `medaug train-encoder` end to end: files, numbers, bad input, the encoder on BUSI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import ManifestEntry, append_manifest
from medaug.metrics.distances import frechet_distance
from medaug.metrics.imagesets import load_all, open_image_set
from tests.conftest import shared_dataset
from tests.test_metrics import phantom_uint8, write_images

runner = CliRunner()
FAST = ["--kid_subsets", "10", "--diversity_pairs", "4", "--nearest_k", "2"]


def invoke(*args):
    result = runner.invoke(app, [str(arg) for arg in args])
    return result, " ".join(result.output.split())  # undo terminal wrapping


@pytest.fixture(scope="module")
def copies_dir(phantom_dir, tmp_path_factory):
    """A 'synthetic' folder: two exact and two noised copies of training images, and four new phantoms."""
    from medaug.data import make_phantom_dataset

    train = phantom_uint8(phantom_dir, "train")
    rng = np.random.default_rng(0)
    noised = [np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8) for image in train[2:4]]
    fresh = make_phantom_dataset(tmp_path_factory.mktemp("fresh"), num_images=4, size=80, seed=99)
    new = [np.asarray(Image.open(path)) for path in sorted((fresh / "images").glob("*.png"))]
    labels = ["round", "irregular"] * 4
    folder = write_images(tmp_path_factory.mktemp("synthetic"), train[:2] + noised + new, labels)
    for number in range(8):
        append_manifest(folder, ManifestEntry(file_name=f"images/{number:03d}.png", seed=number, model_dir="runs/lora"))
    return folder


@pytest.fixture(scope="module")
def evaluated(phantom_dir, copies_dir, tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluate")
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", copies_dir, "--output_dir", output,
                          "--model_path", tiny_model_dir, "--save_features", *FAST)
    assert result.exit_code == 0, text
    return output, text


def test_evaluate_writes_metrics_report_plot_and_features(evaluated):
    output, text = evaluated
    for name in ("metrics.json", "report.html", "pca.png", "features.npz"):
        assert (output / name).is_file(), name
    metrics = json.loads((output / "metrics.json").read_text())
    features = metrics["features"]
    assert features["extractor"] == "hf" and "CLIPVisionModelWithProjection" in features["preprocessing"]
    assert metrics["real"]["images"] == 14 and metrics["synthetic"]["images"] == 8
    assert metrics["synthetic"]["generated_by"] == ["runs/lora"]  # provenance from manifest.jsonl
    assert len(metrics["memorisation"]["per_image"]) == 8
    assert set(features["per_label"]) == {"round", "irregular"}
    assert "Fréchet distance" in text and "extractor hf" in text
    with np.load(output / "features.npz") as saved:  # anyone can recompute a number from the saved features
        assert saved["real"].shape == (14, 32) and saved["synthetic"].shape == (8, 32)
        assert frechet_distance(saved["real"], saved["synthetic"]) == pytest.approx(
            features["metrics"]["frechet_distance"], rel=1e-9)
        assert list(saved["real_labels"][:2]) == ["round", "irregular"]


def test_evaluate_lists_copies_and_noised_copies_as_near_copies(evaluated, phantom_dir):
    output, _ = evaluated
    audit = json.loads((output / "metrics.json").read_text())["memorisation"]
    flagged = sorted(pair["synthetic"] for pair in audit["near_copies"])
    assert flagged == [f"images/{n:03d}.png" for n in range(4)]  # not the four new phantoms
    sources = open_image_set(phantom_dir, "train", "--real").file_names[:4]
    assert [pair["nearest_real"] for pair in sorted(audit["near_copies"], key=lambda p: p["synthetic"])] == sources
    report = (output / "report.html").read_text()
    assert report.count('class="pair"') == 4 and f"nearest real: {sources[0].split('/')[-1]}" in report


def test_a_disjoint_real_split_is_not_flagged(phantom_dir, tiny_model_dir, tmp_path):
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", phantom_dir, "--synthetic_split", "test",
                          "--output_dir", tmp_path, "--model_path", tiny_model_dir, *FAST)
    assert result.exit_code == 0, text
    audit = json.loads((tmp_path / "metrics.json").read_text())["memorisation"]
    assert audit["flagged_count"] == 0 and audit["ratio_min"] > 0.6


def test_too_few_synthetic_images_says_how_many_are_needed(phantom_dir, tiny_model_dir, tmp_path):
    few = write_images(tmp_path / "few", phantom_uint8(phantom_dir, "test")[:3])
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", few, "--output_dir", tmp_path / "out",
                          "--model_path", tiny_model_dir)
    assert result.exit_code == 2
    assert "--synthetic" in text and "needs at least 6 images, found 3" in text and "--nearest_k" in text


def test_different_channel_counts_stop_evaluate(phantom_dir, tiny_model_dir, tmp_path):
    colour = write_images(tmp_path / "colour", list(np.random.default_rng(1).integers(0, 255, (6, 32, 32, 3),
                                                                                     dtype=np.uint8)))
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", colour, "--output_dir", tmp_path / "out",
                          "--model_path", tiny_model_dir, *FAST)
    assert result.exit_code == 2 and "1-channel (grey)" in text and "3-channel (colour)" in text
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_extractor_flags_are_named(phantom_dir, tiny_model_dir, tmp_path):
    unet = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", phantom_dir, "--output_dir", tmp_path,
                          "--inception_weights", unet)
    assert result.exit_code == 2 and "--inception_weights" in text and "not an Inception-v3 checkpoint" in text
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", phantom_dir, "--output_dir", tmp_path)
    assert result.exit_code == 2 and "--features" in text and "medaug train-encoder" in text
    result, text = invoke("evaluate", "--real", phantom_dir, "--synthetic", phantom_dir, "--output_dir", tmp_path,
                          "--encoder_dir", tmp_path / "nowhere")
    assert result.exit_code == 2 and "--encoder_dir" in text and "not a medaug encoder folder" in text


def busi_subset(folder, per_split: int = 6):
    """A few BUSI images of each split copied into `folder` (links outward would be refused)."""
    busi = shared_dataset("busi")
    table = pd.read_csv(busi / "metadata.csv")
    rows = pd.concat([table[table["split"] == s].groupby("label").head(2).head(per_split) for s in ("train", "test")])
    for column in ("file_name", "mask_file_name"):
        for name in rows[column]:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(busi / name, folder / name)
    rows.to_csv(folder / "metadata.csv", index=False)
    return folder


def test_train_encoder_on_busi_writes_an_encoder_that_evaluate_uses(tmp_path):
    import torch

    from medaug.metrics.encoder import load_encoder

    data = busi_subset(tmp_path / "busi")
    encoder_dir = tmp_path / "encoder"
    conflict, text = invoke("train-encoder", data, "--output_dir", encoder_dir, "--max_images", 4,
                            "--max_train_samples", 5)
    assert conflict.exit_code == 2 and "--max_images is the old name of --max_train_samples" in text
    result, text = invoke("train-encoder", data, "--output_dir", encoder_dir, "--max_train_steps", 3,
                          "--train_batch_size", 4, "--resolution", 64, "--max_images", 5)  # the old name still works
    assert result.exit_code == 0, text
    assert "on 5 images (1 channel(s), 64 px)" in text
    assert (encoder_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert len((encoder_dir / "training_log.jsonl").read_text().splitlines()) == 3
    again, text = invoke("train-encoder", data, "--output_dir", encoder_dir)
    assert again.exit_code == 2 and "--overwrite" in text

    output = tmp_path / "evaluate"
    result, text = invoke("evaluate", "--real", data, "--synthetic", data, "--synthetic_split", "test",
                          "--encoder_dir", encoder_dir, "--output_dir", output, "--save_features", *FAST)
    assert result.exit_code == 0, text
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["features"]["extractor"] == "encoder" and metrics["features"]["dimensions"] == 256
    assert "pad to 64x64 px" in metrics["features"]["preprocessing"]
    encoder = load_encoder(encoder_dir)
    images = load_all(open_image_set(data, "train", "--real"), 1, 64, "pad")
    with torch.no_grad():
        expected = encoder.features(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    with np.load(output / "features.npz") as saved:
        assert np.allclose(saved["real"], expected, atol=1e-5)  # evaluate used the trained weights
