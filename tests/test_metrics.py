"""Metric maths and feature extractors: Fréchet distance, KID, PRDC, MS-SSIM, memorisation, Inception, HF."""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pytest
import scipy.linalg
import torch

from medaug.metrics.distances import (
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
    prdc,
)
from medaug.metrics.features import ExtractorError, build_extractor, extract_features
from medaug.metrics.imagesets import ImageSetError, check_same_channels, load_all, open_image_set
from medaug.metrics.inception import INCEPTION_FEATURES, InceptionWeightsError, load_fid_inception
from medaug.metrics.memorisation import memorisation_audit, thumbnail_vectors


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root, in float64."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 32)) * 3 + 1
    assert abs(frechet_distance(features, features)) < 1e-6
    # fewer images than dimensions: singular covariances must still give 0, not NaN
    few = features[:10]
    assert abs(frechet_distance(few, few)) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(300, 24))
    b = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.5 + rng.normal(size=24)
    ours, reference = frechet_distance(a, b), scipy_frechet(a, b)
    assert reference > 1.0  # the case is not trivially zero
    assert ours == pytest.approx(reference, abs=1e-4)


def test_frechet_distance_grows_with_a_mean_shift():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 8))
    shifted = a + 2.0  # identical covariance, mean moved by 2 in each of 8 dimensions
    assert frechet_distance(a, shifted) == pytest.approx(8 * 4.0, rel=1e-9)


def test_kid_estimator_is_unbiased_on_an_enumerable_case():
    """Two distributions uniform over three points each: enumerate every sample of two points drawn with
    replacement from each, and the mean of the estimator equals the population MMD^2 exactly."""
    a = np.array([[0.0, 1.0], [1.0, 2.0], [-1.0, 0.5]])
    b = np.array([[0.5, 0.0], [2.0, 1.0], [0.0, -1.0]])
    population = polynomial_kernel(a, a).mean() + polynomial_kernel(b, b).mean() - 2 * polynomial_kernel(a, b).mean()
    samples = list(itertools.product(range(3), repeat=2))
    estimates = [mmd2_unbiased(a[list(x)], b[list(y)]) for x in samples for y in samples]
    assert population > 0.1
    assert np.mean(estimates) == pytest.approx(population, rel=1e-12)
    # the biased (V-statistic) estimator, diagonal included, would miss it
    biased = [polynomial_kernel(a[list(x)], a[list(x)]).mean() + polynomial_kernel(b[list(y)], b[list(y)]).mean()
              - 2 * polynomial_kernel(a[list(x)], b[list(y)]).mean() for x in samples for y in samples]
    assert abs(np.mean(biased) - population) > 0.1


def test_kid_reports_mean_and_std_over_subsets_and_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(4)
    same = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), subsets=20,
                                     subset_size=100)
    different = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) + 1, subsets=20,
                                           subset_size=100)
    assert same["kid_subsets"] == 20 and same["kid_subset_size"] == 100 and same["kid_std"] > 0
    assert abs(same["kid_mean"]) < 3 * same["kid_std"]
    assert different["kid_mean"] > 10 * same["kid_std"]
    assert kernel_inception_distance(np.ones((5, 4)), np.ones((50, 4)), subsets=2)["kid_subset_size"] == 5


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(60, 6))
    same = prdc(real, real.copy(), nearest_k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(real, real + 100.0, nearest_k=5)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    with pytest.raises(ValueError, match="needs at least 6 images per set"):
        prdc(real, real[:5], nearest_k=5)


def write_images(folder: pathlib.Path, images: list[np.ndarray], labels: list[str] | None = None) -> pathlib.Path:
    """A dataset folder (metadata.csv, images/) holding `images` (uint8 arrays)."""
    import pandas as pd
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for number, image in enumerate(images):
        names.append(f"images/{number:03d}.png")
        Image.fromarray(image).save(folder / names[-1])
    table = {"file_name": names}
    if labels is not None:
        table["label"] = labels
    pd.DataFrame(table).to_csv(folder / "metadata.csv", index=False)
    return folder


def phantom_uint8(phantom_dir: pathlib.Path, split: str) -> list[np.ndarray]:
    image_set = open_image_set(phantom_dir, split, "--real")
    return [(image_set.load(p, 1)[:, :, 0] * 255).round().astype(np.uint8) for p in range(len(image_set))]


def test_memorisation_audit_flags_copies_and_noised_copies_not_a_disjoint_split(phantom_dir, tmp_path):
    train = phantom_uint8(phantom_dir, "train")
    rng = np.random.default_rng(6)
    noised = [np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8) for image in train[5:9]]
    copies_dir = write_images(tmp_path / "copies", train[:4] + noised)
    real = open_image_set(phantom_dir, "train", "--real")
    real_vectors = thumbnail_vectors(load_all(real, 1, 64, "pad"))

    copies_vectors = thumbnail_vectors(load_all(open_image_set(copies_dir, None, "--synthetic"), 1, 64, "pad"))
    copies = memorisation_audit(real_vectors, copies_vectors)
    assert sorted(copies["flagged"].tolist()) == list(range(8))
    assert np.allclose(copies["ratios"][:4], 0, atol=1e-6)
    assert copies["nearest"].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]  # each points at its own source image
    assert (copies["ratios"][4:] > 0.01).all()  # the noise is really there

    disjoint = open_image_set(phantom_dir, "test", "--synthetic")
    held_out = memorisation_audit(real_vectors, thumbnail_vectors(load_all(disjoint, 1, 64, "pad")))
    assert len(held_out["flagged"]) == 0
    assert (held_out["ratios"] > 0.6).all()


def test_ms_ssim_diversity_is_one_for_identical_images_and_lower_for_a_real_split(phantom_dir, tmp_path):
    from medaug.metrics.diversity import ms_ssim_diversity

    image = phantom_uint8(phantom_dir, "train")[0]
    clones = open_image_set(write_images(tmp_path / "clones", [image] * 4), None, "--synthetic")
    assert ms_ssim_diversity(clones, 1, pairs=6)["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-4)
    varied = ms_ssim_diversity(open_image_set(phantom_dir, "train", "--real"), 1, pairs=10)
    assert varied["pairs"] == 10 and varied["ms_ssim_mean"] < 0.6


def test_different_channel_counts_are_refused_naming_both_folders(phantom_dir, tmp_path):
    colour = np.random.default_rng(7).integers(0, 255, size=(6, 40, 40, 3), dtype=np.uint8)
    colour_dir = write_images(tmp_path / "colour", list(colour))
    grey_as_rgb = write_images(tmp_path / "grey_rgb", [np.repeat(i[:, :, None], 3, 2) for i in colour[..., 0]])
    real = open_image_set(phantom_dir, "train", "--real")
    with pytest.raises(ImageSetError, match=r"1-channel \(grey\).*3-channel \(colour\)") as error:
        check_same_channels(real, open_image_set(colour_dir, None, "--synthetic"))
    assert str(phantom_dir.resolve()) in str(error.value) and "colour" in str(error.value)
    assert check_same_channels(real, open_image_set(grey_as_rgb, None, "--synthetic")) == 1  # grey stored as RGB


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> pathlib.Path:
    """Random weights in the layout of FID's Inception file (torchvision names, 1008 classes)."""
    from safetensors.torch import save_file
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    state = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    path = tmp_path_factory.mktemp("inception") / "pt_inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_inception_extractor_gives_2048_features_from_safetensors_and_state_dict(inception_weights, tmp_path):
    from safetensors.torch import load_file

    network = load_fid_inception(inception_weights)
    images = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        features = network(images)
    assert features.shape == (2, INCEPTION_FEATURES) and torch.isfinite(features).all()
    pth = tmp_path / "pt_inception.pth"
    torch.save(load_file(str(inception_weights)), pth)  # a plain state dict, as FID tools ship it
    with torch.no_grad():
        assert torch.allclose(load_fid_inception(pth)(images), features, atol=1e-5)


def test_a_weights_file_that_is_not_inception_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(InceptionWeightsError, match="not an Inception-v3 checkpoint"):
        load_fid_inception(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ExtractorError, match="--inception_weights .*not an Inception-v3 checkpoint"):
        build_extractor("inception", inception_weights=tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text = tmp_path / "weights.pth"
    text.write_text("not weights")
    with pytest.raises(InceptionWeightsError, match="weights.pth: not loadable as plain tensors"):
        load_fid_inception(text)


class Payload:
    """Unpickling this would create a file: proof that nothing but tensors is unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_carrying_code_is_never_run(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, path)
    with pytest.raises(InceptionWeightsError, match="evil.pth: not loadable as plain tensors"):
        load_fid_inception(path)
    assert not marker.exists()


def test_hf_extractor_reads_a_stable_diffusion_folder_or_its_image_encoder(tiny_model_dir, phantom_dir):
    images = open_image_set(phantom_dir, "test", "--real")
    whole = build_extractor("hf", model_path=tiny_model_dir)
    direct = build_extractor("hf", model_path=tiny_model_dir / "image_encoder")
    assert whole.resolution == 64 and "CLIPVisionModelWithProjection image_embeds" in whole.preprocessing
    first, second = extract_features(whole, images), extract_features(direct, images)
    assert first.shape == (len(images), 32) and np.allclose(first, second)
    assert np.std(first, axis=0).max() > 0  # different images give different features
    with pytest.raises(ExtractorError, match="not a Hugging Face model folder"):
        build_extractor("hf", model_path=phantom_dir)
    with pytest.raises(ExtractorError, match="--features encoder needs --encoder_dir"):
        build_extractor("encoder")


def test_simclr_loss_rewards_matching_views_and_augment_makes_different_valid_views():
    from medaug.metrics.encoder import augment, nt_xent

    distinct = torch.eye(8, 16) * 10  # eight orthogonal embeddings: cosine 1 with their pair, 0 with the 14 others
    matched = nt_xent(distinct, distinct, temperature=0.2)
    assert matched.item() == pytest.approx(np.log(1 + 14 * np.exp(-5)), rel=1e-5)
    shifted = nt_xent(distinct, distinct.roll(1, dims=0), 0.2)  # every view paired with the wrong image
    assert shifted.item() == pytest.approx(np.log(np.exp(5) + 14), rel=1e-5)  # the impostor wins
    images = torch.rand(4, 1, 32, 32)
    first = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    second = augment(images, torch.Generator().manual_seed(2))
    assert first.shape == images.shape and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again) and not torch.allclose(first, second) and not torch.allclose(first, images)
