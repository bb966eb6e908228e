"""A 2D PCA picture of real and synthetic features: one panel for all images, one per label."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pca_projection(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both sets projected on the first two principal axes of their union, and the explained variance ratios."""
    union = np.concatenate([real, synthetic]).astype(np.float64)
    centre = union.mean(axis=0)
    _, singular, axes = np.linalg.svd(union - centre, full_matrices=False)
    axes = axes[:2]
    if axes.shape[0] < 2:  # one-dimensional features: pad a zero axis so the plot still has two
        axes = np.vstack([axes, np.zeros_like(axes)])
    variance = singular ** 2
    explained = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return (real - centre) @ axes.T, (synthetic - centre) @ axes.T, np.pad(explained, (0, 2 - len(explained)))


def plot_pca(path: str | Path, real: np.ndarray, synthetic: np.ndarray, real_labels: list[str],
             synthetic_labels: list[str], title: str) -> Path:
    """Write a scatter PNG (real vs synthetic, per label where labels exist) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_2d, synthetic_2d, explained = pca_projection(real, synthetic)
    labels = sorted(set(real_labels) & set(synthetic_labels) - {""})
    panels = [("all images", None)] + [(f"label: {label}", label) for label in labels]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for axis, (name, label) in zip(axes[0], panels):
        real_mask = np.array([label is None or value == label for value in real_labels], dtype=bool)
        synthetic_mask = np.array([label is None or value == label for value in synthetic_labels], dtype=bool)
        axis.scatter(*real_2d[real_mask].T, s=10, alpha=0.6, label=f"real ({real_mask.sum()})", color="#1f77b4")
        axis.scatter(*synthetic_2d[synthetic_mask].T, s=10, alpha=0.6, label=f"synthetic ({synthetic_mask.sum()})",
                     color="#ff7f0e", marker="^")
        axis.set_title(name)
        axis.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        axis.set_ylabel(f"PC2 ({explained[1]:.0%})")
        axis.legend(loc="best", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
