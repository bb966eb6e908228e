"""Distances between two sets of features: Fréchet distance, KID, precision/recall/density/coverage.

All take (N, D) arrays of features from one extractor and compute in float64.
"""

from __future__ import annotations

import numpy as np

# The fewest images per set each metric is defined for.
FRECHET_MIN_IMAGES = 2  # a covariance needs two samples
KID_MIN_IMAGES = 2  # the unbiased estimator leaves out the diagonal


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < FRECHET_MIN_IMAGES:
        raise ValueError(f"need (N, D) features with N >= {FRECHET_MIN_IMAGES}, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix, by its eigendecomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_from_statistics(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric matrix
    S_a^(1/2) S_b S_a^(1/2), which stays real and stable where S_a or S_b is singular (fewer images than
    feature dimensions), unlike a general matrix square root of S_a S_b.
    """
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    difference = mean_a - mean_b
    value = difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(max(value, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's)."""
    return frechet_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel: (x.y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of the squared MMD with KID's kernel (diagonal terms left out)."""
    m, n = x.shape[0], y.shape[0]
    if min(m, n) < KID_MIN_IMAGES:
        raise ValueError(f"the unbiased MMD needs at least {KID_MIN_IMAGES} samples per set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(real: np.ndarray, synthetic: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> dict:
    """KID: the unbiased MMD^2 averaged over random subsets; its std over subsets says how settled it is.

    Each subset draws `subset_size` images (or all, where a set is smaller) without replacement from each set.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    size = min(subset_size, real.shape[0], synthetic.shape[0])
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(real[rng.choice(real.shape[0], size, replace=False)],
                            synthetic[rng.choice(synthetic.shape[0], size, replace=False)]) for _ in range(subsets)]
    return {"kid_mean": float(np.mean(values)), "kid_std": float(np.std(values)), "kid_subsets": subsets,
            "kid_subset_size": size}


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(squared, 0, None))


def _kth_neighbour_radius(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set."""
    distances = _pairwise(features, features)
    return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself


def prdc(real: np.ndarray, synthetic: np.ndarray, nearest_k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem et al., 2020) with k-nearest-neighbour balls.

    precision: share of synthetic images inside some real image's ball (fidelity); recall: share of real
    images inside some synthetic image's ball (diversity); density: how many real balls hold each synthetic
    image, over k (about 1 when the sets match); coverage: share of real images whose ball holds a synthetic one.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    needed = nearest_k + 1
    if min(real.shape[0], synthetic.shape[0]) < needed:
        raise ValueError(f"precision/recall with k={nearest_k} needs at least {needed} images per set, "
                         f"got {real.shape[0]} real and {synthetic.shape[0]} synthetic")
    real_radius = _kth_neighbour_radius(real, nearest_k)
    synthetic_radius = _kth_neighbour_radius(synthetic, nearest_k)
    cross = _pairwise(real, synthetic)  # (real, synthetic)
    inside_real = cross < real_radius[:, None]
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((cross < synthetic_radius[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum() / (nearest_k * synthetic.shape[0])),
        "coverage": float((cross.min(axis=1) < real_radius).mean()),
        "nearest_k": nearest_k,
    }
