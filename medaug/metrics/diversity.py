"""Diversity within one image set: mean MS-SSIM over random pairs of its images (MONAI's metric).

High MS-SSIM between images of one set means they look alike: a generator that collapsed onto a few
modes scores near 1. The same number on the real images gives the level to expect.
"""

from __future__ import annotations

import numpy as np
import torch

from medaug.data import fit_square
from medaug.metrics.imagesets import ImageSet

# MONAI's MS-SSIM with five scales and an 11-pixel window needs images larger than 160 px.
MS_SSIM_RESOLUTION = 192
MS_SSIM_MIN_IMAGES = 2


def random_pairs(count: int, pairs: int, seed: int) -> np.ndarray:
    """Up to `pairs` distinct unordered index pairs (i < j) of `count` items; all pairs when there are few."""
    total = count * (count - 1) // 2
    rng = np.random.default_rng(seed)
    if total <= pairs:
        first, second = np.triu_indices(count, k=1)
        return np.stack([first, second], axis=1)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < pairs:
        i, j = rng.choice(count, size=2, replace=False)
        chosen.add((min(i, j), max(i, j)))
    return np.array(sorted(chosen))


def ms_ssim_diversity(image_set: ImageSet, channels: int, pairs: int = 100, seed: int = 0, fit: str = "pad",
                      batch_size: int = 25) -> dict:
    """Mean and std of MS-SSIM over random pairs of a set's images (lower: more diverse)."""
    from monai.metrics import MultiScaleSSIMMetric

    if len(image_set) < MS_SSIM_MIN_IMAGES:
        raise ValueError(f"{image_set.describe()}: MS-SSIM diversity needs at least {MS_SSIM_MIN_IMAGES} images")
    chosen = random_pairs(len(image_set), pairs, seed)
    needed = sorted(set(chosen.flatten().tolist()))
    images = {p: _tensor(image_set.load(p, channels), fit) for p in needed}
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0)
    values = []
    for start in range(0, len(chosen), batch_size):
        block = chosen[start:start + batch_size]
        first = torch.stack([images[i] for i in block[:, 0]])
        second = torch.stack([images[j] for j in block[:, 1]])
        values.append(metric(first, second).mean(dim=1).double().numpy())
    values = np.concatenate(values)
    return {"ms_ssim_mean": float(values.mean()), "ms_ssim_std": float(values.std()), "pairs": int(len(values)),
            "resolution": MS_SSIM_RESOLUTION}


def _tensor(image: np.ndarray, fit: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(fit_square(image, MS_SSIM_RESOLUTION, fit).transpose(2, 0, 1)))
