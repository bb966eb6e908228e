"""Augmentations and named policies for self-supervised pre-training.

Each augmentation is a MONAI array transform where MONAI has one (flip, rotation, Gaussian blur, random erasing
as coarse dropout, random resized crop), and the project's own otherwise (chessboard cut-out; CLAHE, which is
pre-processing here, applied once to every image with `--clahe`, not drawn per view). A policy is a named list
of augmentations; two views of an image are two independent draws of its policy. Up-down flips are left out:
depth has a direction in ultrasound and radiographs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

AUGMENTATIONS = ("crop", "flip", "rotation", "blur", "erasing", "chessboard")

# The policies of the study: one family of augmentation each, then all of them; every policy starts from a
# random resized crop, without which two views of an image are nearly the same picture and nothing is learnt.
POLICIES = {
    "crop": ("crop",),
    "geometric": ("crop", "flip", "rotation"),
    "blur": ("crop", "blur"),
    "occlusion": ("crop", "erasing", "chessboard"),
    "all": ("crop", "flip", "rotation", "blur", "erasing", "chessboard"),
}


class PolicyError(ValueError):
    """An unknown policy or augmentation; the message names it and what is known."""


@dataclass(frozen=True)
class Policy:
    name: str
    augmentations: tuple[str, ...]


def parse_policies(text: str) -> list[Policy]:
    """`geometric,all` (named policies) or `crop+flip` (augmentations joined by +), comma separated."""
    policies = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        augmentations = POLICIES.get(name) or tuple(part.strip() for part in name.split("+"))
        unknown = [part for part in augmentations if part not in AUGMENTATIONS]
        if unknown:
            raise PolicyError(f"--policies: '{name}' is neither a policy ({', '.join(POLICIES)}) nor augmentations "
                              f"joined by + ({', '.join(AUGMENTATIONS)}); unknown: {', '.join(unknown)}")
        policies.append(Policy(name, augmentations))
    if not policies:
        raise PolicyError("--policies: give at least one policy")
    if len({policy.name for policy in policies}) < len(policies):
        raise PolicyError(f"--policies: '{text}' names a policy twice")
    return policies


def augmentation(name: str, resolution: int, prob: float = 0.5):
    """One MONAI-style random transform of (C, H, W) arrays in [0, 1], applied with probability `prob` (a crop is
    always drawn)."""
    from monai.transforms import (Compose, RandCoarseDropout, RandFlip, RandGaussianSmooth, RandRotate,
                                  RandSpatialCrop, Resize)

    from medaug.segmentation.transforms import RandChessboardCutout

    hole = max(2, resolution // 8)
    builders = {
        "crop": lambda: Compose([RandSpatialCrop(roi_size=int(resolution * 0.6), max_roi_size=resolution,
                                                 random_size=True), Resize((resolution, resolution))]),
        "flip": lambda: RandFlip(prob=prob, spatial_axis=1),
        "rotation": lambda: RandRotate(range_x=math.radians(20), prob=prob, padding_mode="zeros"),
        "blur": lambda: RandGaussianSmooth(sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), prob=prob),
        "erasing": lambda: RandCoarseDropout(holes=1, max_holes=3, spatial_size=hole, max_spatial_size=3 * hole,
                                             fill_value=0.0, prob=prob),
        "chessboard": lambda: RandChessboardCutout(prob=prob),
    }
    if name not in builders:
        raise PolicyError(f"unknown augmentation '{name}'; known: {', '.join(AUGMENTATIONS)}")
    return builders[name]()


class ViewMaker:
    """Random views of a batch under one policy, seeded, so a run repeats."""

    def __init__(self, policy: Policy, resolution: int, seed: int):
        from monai.transforms import Compose

        self.transform = Compose([augmentation(name, resolution) for name in policy.augmentations])
        self.transform.set_random_state(seed=seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, R, R) in [0, 1] -> one view of each, same shape."""
        views = [torch.as_tensor(np.asarray(self.transform(image.numpy())), dtype=torch.float32) for image in images]
        return torch.stack(views).clamp(0.0, 1.0)


def clahe(images: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of every image (OpenCV), as pre-processing."""
    import cv2

    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    eight_bit = np.round(images.clamp(0, 1).numpy() * 255).astype(np.uint8)
    equalised = np.stack([[equaliser.apply(channel) for channel in image] for image in eight_bit])
    return torch.from_numpy(equalised.astype(np.float32) / 255.0)
