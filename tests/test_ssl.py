"""Self-supervised pre-training under augmentation policies: augmentations, BYOL's target, labels kept out of
pre-training, the probe, and a study that resumes and grows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from medaug.metrics.encoder import DomainEncoder
from medaug.ssl.policies import AUGMENTATIONS, PolicyError, ViewMaker, augmentation, clahe, parse_policies
from medaug.ssl.pretrain import Byol, PretrainSettings, pretrain, target_rate
from medaug.ssl.probe import _binary_auc, classification_scores, fit_probe
from medaug.ssl.study import SslSettings, SslStudyError, labelled_data, run_ssl_study, unlabelled_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = PretrainSettings(steps=2, batch_size=4, block_channels=(8, 8, 16, 16))


def structured_image(size: int = 32) -> np.ndarray:
    """A (1, size, size) image with a gradient and a bright disc: every augmentation has something to change."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    disc = ((rows - 0.35) ** 2 + (cols - 0.6) ** 2) < 0.04
    return (0.2 + 0.5 * cols + 0.3 * disc).astype(np.float32)[None]


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_changes_its_input_and_keeps_its_shape(name):
    transform = augmentation(name, 32, prob=1.0)
    transform.set_random_state(seed=0)
    image = structured_image()
    out = np.asarray(transform(image.copy()))
    assert out.shape == image.shape
    assert np.abs(out - image).mean() > 1e-3, name


def test_clahe_changes_contrast_and_policies_are_named_or_composed():
    image = torch.from_numpy(structured_image() * 0.3 + 0.3)[None]  # low contrast
    assert clahe(image).std() > image.std()
    assert [p.augmentations for p in parse_policies("geometric,flip+blur")] == [("crop", "flip", "rotation"),
                                                                               ("flip", "blur")]
    with pytest.raises(PolicyError, match=r"'flip\+solarize' is neither a policy .* unknown: solarize"):
        parse_policies("flip+solarize")
    views = ViewMaker(parse_policies("all")[0], 32, seed=0)
    batch = torch.from_numpy(np.stack([structured_image()] * 3))
    first, second = views(batch), views(batch)
    assert first.shape == batch.shape and not torch.equal(first, second)  # two draws, two views


def test_byol_target_is_an_exponential_moving_average_of_the_online_network():
    torch.manual_seed(0)
    learner = Byol(DomainEncoder(in_channels=1, resolution=32, block_channels=(8, 8, 16, 16)))
    target_before = [p.clone() for p in learner.target_backbone.parameters()]
    optimizer = torch.optim.SGD(learner.online_parameters(), lr=0.5)
    views = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    learner.loss(*views).backward()
    optimizer.step()
    online = [p.detach().clone() for p in learner.encoder.backbone.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(online, target_before))  # the online network moved
    learner.update_target(0.9)
    for target, before, now in zip(learner.target_backbone.parameters(), target_before, online):
        torch.testing.assert_close(target, 0.9 * before + 0.1 * now)
        assert not target.requires_grad
    assert target_rate(0, 10, 0.99) == pytest.approx(0.99) and target_rate(10, 10, 0.99) == pytest.approx(1.0)


def test_pretraining_reads_no_label(phantom_dir, tmp_path):
    """A copy of the data without its label column pre-trains to the very same weights."""
    unlabelled = shutil.copytree(phantom_dir, tmp_path / "unlabelled")
    table = pd.read_csv(unlabelled / "metadata.csv").drop(columns=["label", "text"])
    table.to_csv(unlabelled / "metadata.csv", index=False)
    settings = SslSettings(resolution=32)
    policy = parse_policies("all")[0]
    weights = []
    for folder in (phantom_dir, unlabelled):
        encoder = pretrain(unlabelled_pool(folder, settings, False), "byol", policy, TINY, seed=0)
        weights.append(encoder.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key])
    with pytest.raises(SslStudyError, match="has no column 'label'"):
        labelled_data(unlabelled, settings)  # the probe needs them; pre-training did not


def test_the_probe_beats_chance_on_a_separable_toy_set():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(3, 16))
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + rng.normal(0, 1, size=(120, 16))
    train, val, test = np.arange(0, 120, 3), np.arange(1, 120, 3), np.arange(2, 120, 3)
    probe = fit_probe(features[train], labels[train], features[val], labels[val], 3)
    scores = classification_scores(labels[test], probe.probabilities(features[test]))
    assert scores["accuracy"] > 0.9 and scores["auc"] > 0.95 and scores["macro_f1"] > 0.9
    shuffled = fit_probe(features[train], rng.permutation(labels[train]), features[val], labels[val], 3)
    assert classification_scores(labels[test], shuffled.probabilities(features[test]))["accuracy"] < 0.7
    layer = probe.as_layer()  # the same probe as one linear layer on raw features (for Grad-CAM)
    logits = layer(torch.from_numpy(features[test]).float()).detach().numpy()
    np.testing.assert_array_equal(logits.argmax(1), probe.probabilities(features[test]).argmax(1))


def test_auc_by_ranks():
    positive = np.array([True, True, False, False])
    assert _binary_auc(positive, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert _binary_auc(positive, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert _binary_auc(positive, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(_binary_auc(np.array([True, True]), np.array([0.1, 0.2])))


def _study(phantom_dir, output_dir, **changes):
    settings = SslSettings(**{"methods": ("simclr",), "policies": "crop", "seeds": (0,), "resolution": 32,
                              "pretrain": TINY, "supervised_steps": 2, "gradcam_images": 2, **changes})
    return run_ssl_study(phantom_dir, output_dir, settings)


def test_a_study_resumes_grows_and_refuses_other_settings(phantom_dir, tmp_path):
    summary = _study(phantom_dir, tmp_path / "study")
    assert {(row["method"], row["policy"]) for row in summary["rows"]} == {
        ("simclr", "crop"), ("supervised", "geometric"), ("random", "none")}
    assert summary["class_counts"]["train"] == {"irregular": 7, "round": 7}
    report = (tmp_path / "study" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 1 + 3 * 2  # the plot, and 2 Grad-CAM maps per model
    first = tmp_path / "study" / "runs" / "simclr-crop-real-seed0" / "result.json"
    written = first.stat().st_mtime_ns
    grown = _study(phantom_dir, tmp_path / "study", seeds=(0, 1), methods=("simclr", "byol"))
    assert first.stat().st_mtime_ns == written  # done runs are read back, not redone
    assert len(list((tmp_path / "study" / "runs").iterdir())) == 8  # 2 methods x 2 seeds, 2 baselines x 2 seeds
    assert {row["method"]: len(row["seeds"]) for row in grown["rows"]} == {"simclr": 2, "byol": 2, "supervised": 2,
                                                                           "random": 2}
    assert set(grown["spread"]) == {"simclr", "byol"}
    with pytest.raises(SslStudyError, match="other settings \\(resolution\\)"):
        _study(phantom_dir, tmp_path / "study", resolution=64)
    json.loads((tmp_path / "study" / "summary.json").read_text())  # still whole after the refusal


def test_a_synthetic_pool_from_test_sources_is_refused_before_any_run(phantom_dir, tmp_path):
    from medaug.data import ManifestEntry, append_manifest
    from medaug.data.manifest import file_sha256
    from medaug.segmentation.inputs import StudyError

    synthetic = shutil.copytree(phantom_dir, tmp_path / "syn")
    table = pd.read_csv(synthetic / "metadata.csv").assign(split="train")
    table.to_csv(synthetic / "metadata.csv", index=False)
    test_file = pd.read_csv(phantom_dir / "metadata.csv").query("split == 'test'").file_name.iloc[0]
    for name in table.file_name:
        append_manifest(synthetic, ManifestEntry(file_name=name, seed=0, model_dir="model", source_file_name=test_file,
                                                 source_split="test", sha256=file_sha256(synthetic / name)))
    with pytest.raises(StudyError, match="generated from test-split source"):
        _study(phantom_dir, tmp_path / "study", synthetic=str(synthetic))
    assert not (tmp_path / "study" / "runs").exists()


def test_the_ssl_command_takes_a_config_file_and_command_line_flags_win(phantom_dir, tmp_path):
    from typer.testing import CliRunner

    from medaug.cli import app

    (tmp_path / "ssl.yaml").write_text("method: simclr\npolicies: crop\nseeds: '0'\nresolution: 32\nsteps: 1\n"
                                       "supervised_steps: 1\nbatch_size: 4\ngradcam_images: 1\n")
    result = CliRunner().invoke(app, ["ssl", "--data", str(phantom_dir), "--output_dir", str(tmp_path / "out"),
                                      "--config", str(tmp_path / "ssl.yaml"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "ssl_settings.json").read_text())
    assert settings["policies"] == "crop" and settings["resolution"] == 32 and settings["pretrain"]["steps"] == 2
