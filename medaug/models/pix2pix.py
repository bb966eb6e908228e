"""pix2pix: a U-Net that turns a mask (and a noise channel) into an image, and a PatchGAN discriminator that judges
(mask, image) pairs patch by patch (Isola et al., 2017; written here from the paper's description).

The generator is MONAI's residual UNet; its output passes through tanh into [-1, 1]. The discriminator is a stack
of strided 4x4 convolutions with instance norm and leaky ReLU ending in one logit per patch, trained with the
least-squares GAN loss. Both are diffusers `ModelMixin` models, so they save and load like the UNet.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class Pix2PixGenerator(ModelMixin, ConfigMixin):
    """(mask in {0, 1}, noise) -> image in [-1, 1]; `mask_channels` + `noise_channels` inputs, `out_channels` outputs."""

    @register_to_config
    def __init__(self, out_channels: int = 1, mask_channels: int = 1, noise_channels: int = 1,
                 channels: tuple[int, ...] = (32, 64, 128, 256), num_res_units: int = 2, dropout: float = 0.0):
        super().__init__()
        from monai.networks.nets import UNet

        self.net = UNet(spatial_dims=2, in_channels=mask_channels + noise_channels, out_channels=out_channels,
                        channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=num_res_units,
                        dropout=dropout)

    @property
    def multiple(self) -> int:
        """What the input size must divide by."""
        return 2 ** (len(self.config.channels) - 1)

    def forward(self, masks: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(torch.cat([masks * 2.0 - 1.0, noise], dim=1)))


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """(mask, image) -> a grid of real/fake logits, one per overlapping patch."""

    @register_to_config
    def __init__(self, in_channels: int = 2, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for layer in range(1, layers):
            wider = min(width * 2 ** layer, width * 8)
            blocks += [nn.Conv2d(channels, wider, 4, 2, 1), nn.InstanceNorm2d(wider, affine=True), nn.LeakyReLU(0.2)]
            channels = wider
        blocks += [nn.Conv2d(channels, channels, 4, 1, 1), nn.InstanceNorm2d(channels, affine=True),
                   nn.LeakyReLU(0.2), nn.Conv2d(channels, 1, 4, 1, 1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([masks * 2.0 - 1.0, images], dim=1))
