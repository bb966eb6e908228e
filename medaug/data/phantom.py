"""A synthetic ultrasound-like dataset that medaug writes itself, so demos and tests need no downloads.

Each image is speckle (Rayleigh-distributed, as in B-mode ultrasound) over smooth tissue layers, with one
dark lesion of two kinds: `round` (a smooth ellipse) or `irregular` (a lobulated outline). Masks mark the
lesion. These are phantoms, not medical data: they exercise the code paths, not clinical claims.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

LESION_KINDS = ("round", "irregular")


def lesion_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) lesion of the given kind at a random place."""
    centre = rng.uniform(0.35, 0.65, size=2) * size
    radius = rng.uniform(0.10, 0.18) * size
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    if kind == "round":
        aspect = rng.uniform(0.6, 1.0)
        radii = radius * np.ones_like(angles)
        points = np.stack([radii * np.cos(angles), aspect * radii * np.sin(angles)], axis=1)
    elif kind == "irregular":
        lobes = rng.integers(5, 9)
        phase = rng.uniform(0, 2 * np.pi)
        radii = radius * (1 + 0.35 * np.sin(lobes * angles + phase) + rng.normal(0, 0.08, angles.size))
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown lesion kind '{kind}'; expected one of {LESION_KINDS}")
    polygon = np.round(points + centre).astype(np.int32)
    mask = np.zeros((size, size), dtype=np.uint8)
    cv2.fillPoly(mask, [polygon], 1)
    return mask.astype(bool)


def phantom_image(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8-bit speckled image with the lesion of `mask` dark and a brighter band beneath it."""
    size = mask.shape[0]
    rows = np.linspace(0, 1, size)[:, None]
    layers = 0.55 + 0.25 * np.sin(2 * np.pi * (rows * rng.uniform(1.5, 3.0) + rng.uniform(0, 1)))
    tissue = np.broadcast_to(layers, (size, size)).copy()
    tissue *= 1.0 - 0.45 * rows  # attenuation with depth
    soft_mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigmaX=1.5)
    tissue *= 1.0 - 0.75 * soft_mask
    columns = mask.any(axis=0)
    below = np.cumsum(mask, axis=0) > 0
    tissue += 0.15 * (below & ~mask & columns[None, :])  # posterior acoustic enhancement
    speckle = rng.rayleigh(scale=0.6, size=(size, size))
    speckle = cv2.GaussianBlur(speckle.astype(np.float32), (0, 0), sigmaX=0.7)
    image = np.clip(tissue * speckle, 0, 1)
    return (image * 255).astype(np.uint8)


def make_phantom_dataset(output_dir: str | Path, num_images: int = 40, size: int = 96, seed: int = 0) -> Path:
    """Write images/, masks/ and metadata.csv (70/10/20 train/val/test per kind) and return the folder."""
    if num_images < len(LESION_KINDS):
        raise ValueError(f"num_images must be at least {len(LESION_KINDS)}, got {num_images}")
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    (output_dir / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(num_images):
        kind = LESION_KINDS[number % len(LESION_KINDS)]
        mask = lesion_mask(kind, size, rng)
        name = f"{kind}_{number:04d}.png"
        cv2.imwrite(str(output_dir / "images" / name), phantom_image(mask, rng))
        cv2.imwrite(str(output_dir / "masks" / name), mask.astype(np.uint8) * 255)
        rows.append({
            "file_name": f"images/{name}",
            "mask_file_name": f"masks/{name}",
            "label": kind,
            "text": f"phantom ultrasound, {kind} lesion",
            "split": _split_for(number // len(LESION_KINDS)),
        })
    pd.DataFrame(rows).to_csv(output_dir / "metadata.csv", index=False)
    return output_dir


def _split_for(rank: int) -> str:
    position = rank % 10
    return "test" if position in (2, 7) else "val" if position == 5 else "train"
