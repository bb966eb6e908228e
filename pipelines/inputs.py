"""Control images as medaug's ControlNet pipeline accepts them (conditions: medaug.condition_inputs)."""

from __future__ import annotations

import numpy as np
import torch

from medaug.condition_inputs import image_list


def control_batch(control_image, height: int, width: int) -> torch.Tensor:
    """(B, 3, height, width) float32 in [0, 1]: the 3-channel edge maps ControlNet is trained on."""
    images = image_list(control_image, "control_image")
    for image in images:
        if image.shape[:2] != (height, width):
            raise ValueError(f"control_image: size {image.shape[1]}x{image.shape[0]} differs from the output "
                             f"size {width}x{height} (width x height); pass an edge map of that size, or height "
                             "and width to match it")
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
