"""What a caller may pass as a condition value or a control image (paths, PIL images, arrays, tensors), turned
into arrays and tensors. The condition classes and medaug's pipelines use these.

Each function raises ValueError naming the argument and the shape it expected, so a caller with the wrong
input learns what to pass instead of meeting a shape error deep inside the UNet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def embedding_batch(embeddings, feature_shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *feature_shape) float32 from one embedding of `feature_shape` or a batch of them."""
    feature_shape = tuple(feature_shape)
    values = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(
        np.asarray(embeddings, dtype=np.float32))
    values = values.float()
    if tuple(values.shape) == feature_shape:
        values = values[None]
    if values.ndim != len(feature_shape) + 1 or tuple(values.shape[1:]) != feature_shape:
        raise ValueError(f"embeddings: expected shape {shape_text(feature_shape)} or "
                         f"{shape_text(('B',) + feature_shape)} (the model's condition encoder input), "
                         f"got {shape_text(tuple(values.shape))}")
    if values.shape[0] == 0:
        raise ValueError("embeddings: the batch is empty")
    if not torch.isfinite(values).all():
        raise ValueError("embeddings: contain NaN or infinite values")
    return values


def _as_float_image(image, argument: str) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] from a path, a PIL image, or an (H, W[, C]) array (uint8, or float in [0, 1])."""
    from medaug.data import load_image, rescale_to_unit

    if isinstance(image, (str, Path)):
        return load_image(image, channels=3)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
            image = image.transpose(1, 2, 0)  # (C, H, W) as torch keeps images
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{argument}: expected an image of shape (H, W), (H, W, 1|3) or a PIL image, "
                         f"got an array of shape {shape_text(image.shape)}")
    if image.dtype == np.uint8 or image.dtype == np.uint16:
        image = rescale_to_unit(image) if image.dtype == np.uint16 else image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    if image.size and (image.min() < 0.0 or image.max() > 1.0):
        raise ValueError(f"{argument}: float images must be in [0, 1], got values in "
                         f"[{image.min():.3g}, {image.max():.3g}]")
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]


def image_list(images, argument: str) -> list[np.ndarray]:
    """One image, or a list of them, as (H, W, 3) float arrays; a 4D array or tensor is a batch."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{argument}: the list is empty")
        return [_as_float_image(image, argument) for image in images]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [_as_float_image(image, argument) for image in images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [_as_float_image(image, argument) for image in images]
    return [_as_float_image(images, argument)]
