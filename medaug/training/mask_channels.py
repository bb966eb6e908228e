"""A UNet that reads the mask: the mask, at latent resolution, as extra input channels of `conv_in`.

This is how inpainting models take their mask, and it learns a pixel-aligned condition far faster than a
ControlNet's zero-initialised branch: the first convolution sees, at every latent cell, how much of it the lesion
covers. The new input weights start at zero, so a widened pretrained UNet first computes exactly what it did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def widen_conv_in(unet, extra_channels: int) -> None:
    """Add `extra_channels` zero-initialised input channels to the UNet's first convolution (and its config)."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=old.in_channels + extra_channels)


def latent_masks(masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(B, 1, H, W) masks in {0, 1} -> (B, 1, h, w): the share of each latent cell that the lesion covers."""
    return F.interpolate(masks.float(), size=(latent_size, latent_size), mode="area")


def row_masks(folder, rows: list[int], resolution: int, fit: str) -> torch.Tensor:
    """(N, 1, R, R) float masks of `rows`, fitted to the square as their images are (nearest neighbour)."""
    from medaug.data import fit_square, load_mask

    fitted = [fit_square(load_mask(folder.path(i, "mask_file_name"), folder.slice_index(i)), resolution, fit,
                         nearest=True) for i in rows]
    return torch.stack([torch.from_numpy(mask.astype("float32")) for mask in fitted])[:, None]
