"""medaug's own domain encoder: a small ResNet trained self-supervised (SimCLR) on a dataset folder.

No pretrained network can be downloaded on the machines medaug targets, and an ImageNet network says
little about speckle or lung texture anyway. Training an encoder on the real images themselves gives a
feature space in which a Fréchet distance between real and synthetic sets means something offline.

The encoder saves and loads like a diffusers model (`save_pretrained`: `config.json` and safetensors
weights), and its config holds the preprocessing it was trained with, so `medaug evaluate --features
encoder` feeds it images exactly as in training.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class DomainEncoder(ModelMixin, ConfigMixin):
    """A MONAI ResNet backbone (features for metrics) and an MLP projection head (used only in training)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 96,
        block_channels: tuple[int, ...] = (32, 64, 128, 256),
        layers: tuple[int, ...] = (1, 1, 1, 1),
        projection_dim: int = 128,
        fit: str = "pad",
        method: str = "simclr",
    ):
        super().__init__()
        from monai.networks.nets import ResNet

        self.backbone = ResNet(block="basic", layers=list(layers), block_inplanes=list(block_channels),
                               spatial_dims=2, n_input_channels=in_channels, conv1_t_stride=2, feed_forward=False)
        width = block_channels[-1]
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True),
                                        nn.Linear(width, projection_dim))

    @property
    def feature_dim(self) -> int:
        return self.config.block_channels[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, R, R) images in [0, 1] -> (B, feature_dim) backbone features."""
        return self.backbone(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections for the contrastive loss."""
        return self.projection(self.features(images))

    def preprocessing(self) -> str:
        channels = "grey (1 channel)" if self.config.in_channels == 1 else f"{self.config.in_channels} channels"
        return (f"{channels}, {self.config.fit} to {self.config.resolution}x{self.config.resolution} px, "
                "scaled to [-1, 1]")


def _blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a different sigma per image (sigma 0 leaves the image as it is)."""
    batch, channels, height, width = images.shape
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    safe = sigmas.clamp(min=1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    kernels = kernels.repeat_interleave(channels, dim=0)  # one kernel per (image, channel)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :],
                    groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None],
                    groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per image: the transforms medical SSL work uses, batched.

    Geometry (one affine warp): random resized crop (60-100% of the side), rotation up to 15 degrees,
    left-right flip. Intensity: gamma 0.7-1.5, contrast and brightness jitter, Gaussian blur, Gaussian noise,
    and a random erased rectangle. Vertical flips are left out: depth has a direction in ultrasound and
    radiographs.
    """
    batch = images.shape[0]
    device, dtype = images.device, images.dtype

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator, device=device, dtype=dtype)

    def chance(p: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device) < p

    scale = uniform(0.6, 1.0)
    angle = uniform(-math.pi / 12, math.pi / 12)
    flip = torch.where(chance(0.5), -1.0, 1.0).to(dtype)
    shift_x, shift_y = uniform(-1, 1) * (1 - scale), uniform(-1, 1) * (1 - scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1),
                         torch.stack([sin * flip, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    views = views.clamp(0, 1) ** uniform(0.7, 1.5)[:, None, None, None]
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * uniform(0.7, 1.3)[:, None, None, None] + mean + uniform(-0.1, 0.1)[:, None, None, None]
    views = _blur(views, torch.where(chance(0.5), uniform(0.1, 1.5), torch.zeros_like(scale)))
    noise = torch.randn(views.shape, generator=generator, device=device, dtype=dtype)
    views = views + noise * torch.where(chance(0.5), uniform(0.0, 0.05), torch.zeros_like(scale))[:, None, None, None]
    return _erase(views, chance(0.3), generator).clamp(0, 1)


def _erase(images: torch.Tensor, which: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill a random rectangle (10-30% of each side) with the image mean, for the images in `which`."""
    size = images.shape[-1]
    rows = torch.arange(size, device=images.device)
    out = images.clone()
    for index in torch.nonzero(which).flatten().tolist():
        height, width = (torch.randint(size // 10, max(size // 10 + 1, size * 3 // 10), (2,), generator=generator,
                                       device=images.device)).tolist()
        top, left = (torch.randint(0, size - max(height, width) + 1, (2,), generator=generator,
                                   device=images.device)).tolist()
        box = ((rows >= top) & (rows < top + height))[:, None] & ((rows >= left) & (rows < left + width))[None, :]
        out[index][:, box] = images[index].mean()
    return out


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick out the other view of its image among all 2B - 1 others."""
    batch = first.shape[0]
    both = F.normalize(torch.cat([first, second]), dim=1)
    logits = both @ both.T / temperature
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=both.device), float("-inf"))
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(both.device)
    return F.cross_entropy(logits, targets)


def load_training_images(dataset_dir: str | Path, split: str | None, channels: int, resolution: int,
                         fit: str, max_images: int | None = None) -> torch.Tensor:
    """All images of a split as one (N, C, R, R) tensor in [0, 1]: small sets fit in memory."""
    from medaug.metrics.imagesets import load_all, open_image_set

    image_set = open_image_set(dataset_dir, split, flag="DATASET_DIR", max_images=max_images)
    if len(image_set) < 2:
        raise ValueError(f"{image_set.describe()}: SimCLR needs at least 2 images")
    return torch.from_numpy(load_all(image_set, channels, resolution, fit)).permute(0, 3, 1, 2).contiguous()


def warmup_cosine_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def shuffled_batches(count: int, batch_size: int, seed: int):
    """Endless index batches, reshuffled each epoch; a short last batch is dropped (SimCLR wants full ones)."""
    order = np.random.default_rng(seed)
    while True:
        permutation = order.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            yield permutation[start:start + batch_size]


def train_encoder(
    images: torch.Tensor,
    output_dir: str | Path,
    max_train_steps: int = 1000,
    train_batch_size: int = 64,
    learning_rate: float = 1e-3,
    temperature: float = 0.2,
    seed: int = 0,
    fit: str = "pad",
    block_channels: tuple[int, ...] = (32, 64, 128, 256),
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> DomainEncoder:
    """Train a `DomainEncoder` with SimCLR on `images` (N, C, R, R) in [0, 1] and save it to `output_dir`.

    `output_dir/training_log.jsonl` gets one line per step as training goes, so a long run can be watched.
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    encoder = DomainEncoder(in_channels=images.shape[1], resolution=images.shape[-1],
                            block_channels=tuple(block_channels), fit=fit).to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate, weight_decay=1e-4)
    batches = shuffled_batches(images.shape[0], min(train_batch_size, images.shape[0]), seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "training_log.jsonl", "w", encoding="utf-8") as log:
        for step in range(max_train_steps):
            batch = images[next(batches)].to(device)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_rate(step, max_train_steps, learning_rate, max(1, max_train_steps // 20))
            loss = nt_xent(encoder(augment(batch, generator)), encoder(augment(batch, generator)), temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "time": round(time.time(), 3)}) + "\n")
            log.flush()
            if on_step is not None:
                on_step(step + 1, loss.item())
    encoder.eval()
    save_encoder(encoder, output_dir)
    return encoder


def save_encoder(encoder: DomainEncoder, output_dir: str | Path) -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one tiny shard: its bar is only noise
    encoder.save_pretrained(output_dir)


def load_encoder(encoder_dir: str | Path) -> DomainEncoder:
    """A trained encoder from its folder (safetensors weights only), or an error naming the folder."""
    encoder_dir = Path(encoder_dir)
    config = encoder_dir / DomainEncoder.config_name
    if not config.is_file():
        raise FileNotFoundError(f"{encoder_dir}: not a medaug encoder folder (no {config.name}); "
                                "make one with `medaug train-encoder DATASET_DIR --output_dir DIR`")
    if json.loads(config.read_text()).get("_class_name") != DomainEncoder.__name__:
        raise ValueError(f"{config}: describes a {json.loads(config.read_text()).get('_class_name')}, "
                         f"not a medaug {DomainEncoder.__name__}")
    return DomainEncoder.from_pretrained(encoder_dir, use_safetensors=True).eval()
