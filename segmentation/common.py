"""What the segmentation and classification loops share: device, seeding, cached datasets and loaders."""

from __future__ import annotations

import math

import torch
from monai.data import CacheDataset
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from medaug.segmentation.transforms import build_transforms


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is refused naming --device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: '{device}' requested but CUDA is not available here")
    return torch.device(device)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and random (MONAI's `set_determinism`) and return a generator for shuffling."""
    set_determinism(seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def cached_dataset(items: list[dict], resolution: int, channels: int, fit: str, with_masks: bool,
                   augment: str, seed: int) -> CacheDataset:
    """Items read and made square once (MONAI caches up to the first random transform), augmented per epoch."""
    transform = build_transforms(resolution, channels, fit, with_masks, augment)
    transform.set_random_state(seed=seed)
    return CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)


def make_loader(dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    """Training loaders (shuffled) drop a last partial batch when there are more: a batch of one breaks
    batch normalisation. Workers would fight the training loop for the few CPU cores; the cache does the I/O."""
    drop_last = shuffle and len(dataset) > batch_size
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator,
                      drop_last=drop_last)


def endless(loader):
    """Batches from `loader`, pass after pass (each pass reshuffled and re-augmented): training by steps."""
    while True:
        yield from loader


def train_step(model, inputs, targets, optimizer, loss_function) -> float:
    """One optimiser step on a batch; the loss as a number."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_function(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def validation_interval(steps: int, validations: int) -> int:
    """Steps between validations so that about `validations` fall in `steps` (the last step always validates)."""
    return max(1, math.ceil(steps / max(1, validations)))


def evaluation_batches(items: list[dict], resolution: int, channels: int, fit: str, with_masks: bool,
                       batch_size: int) -> list[dict]:
    """The whole split loaded once into batches, reused at every evaluation."""
    dataset = cached_dataset(items, resolution, channels, fit, with_masks, augment="none", seed=0)
    return list(make_loader(dataset, batch_size, shuffle=False))
