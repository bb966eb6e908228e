"""Training rows as VAE latents: the rows, their pixels, their posteriors (cached across runs), and a batch's
latents drawn from them."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from medaug.data import DatasetFolder, MedicalImageDataset
from medaug.training.cache import TensorCache, file_identity, folder_identity


def training_rows(folder: DatasetFolder, split: str, max_samples: int | None) -> list[int]:
    rows = folder.indices(split)
    return rows[:max_samples] if max_samples else rows


def pixel_dataset(folder: DatasetFolder, split: str, rows: list[int], resolution: int, fit: str
                  ) -> MedicalImageDataset:
    """The training rows as [-1, 1] RGB tensors; building it checks every file."""
    dataset = MedicalImageDataset(folder, split=split, resolution=resolution, channels=3, fit=fit)
    dataset.indices = rows
    return dataset


def image_channels(folder: DatasetFolder, rows: list[int], sample: int = 8) -> int:
    """1 when the rows' images are grey (a model of them makes 3 equal channels), else 3: generation stores
    images as the training data holds them, so synthetic and real folders compare like with like."""
    from medaug.metrics.imagesets import stored_channels

    return max(stored_channels(folder.path(i, "file_name"), folder.slice_index(i)) for i in rows[:sample])


def encode_latents(vae, dataset: MedicalImageDataset, positions: list[int]) -> dict[str, torch.Tensor]:
    """Mean and std of the VAE posterior of the dataset items at `positions`."""
    pixels = torch.stack([dataset[i]["pixel_values"] for i in positions])
    with torch.no_grad():
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"mean": distribution.mean.float().cpu(), "std": distribution.std.float().cpu()}


def encode_all_latents(vae, dataset: MedicalImageDataset, batch_size: int = 8) -> dict[str, torch.Tensor]:
    parts = [encode_latents(vae, dataset, list(range(start, min(start + batch_size, len(dataset)))))
             for start in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", leave=False)]
    return {key: torch.cat([part[key] for part in parts]) for key in ("mean", "std")}


def cached_latents(vae, vae_dir: str | Path, dataset: MedicalImageDataset, fit: str, cache: TensorCache,
                   accelerator) -> dict[str, torch.Tensor]:
    """Latent distributions of every row of `dataset`, from the cache (keyed by the VAE's files, the resolution,
    the fit and every image file) or computed once by the main process."""
    folder = dataset.folder
    key = {"kind": "latents-v1", "vae": folder_identity(Path(vae_dir)), "resolution": dataset.resolution,
           "fit": fit,
           "rows": [(file_identity(folder.path(i, "file_name")), folder.value(i, "slice_index"))
                    for i in dataset.indices]}
    with accelerator.main_process_first():
        return cache.load_or_compute("latents", key, lambda: encode_all_latents(vae, dataset),
                                     write=accelerator.is_main_process)


def batch_latents(latents, vae, dataset, indices, generator, scaling_factor, random_flip, device, paired=()):
    """(scaled latents of a batch, drawn from cached posteriors or (latents None) encoded now; the batch's rows of
    each per-row tensor in `paired` (masks), flipped with the latents)."""
    if latents is None:
        posterior = encode_latents(vae, dataset, indices.tolist())
    else:
        posterior = {key: value[indices] for key, value in latents.items()}
    mean, std = posterior["mean"], posterior["std"]
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    batch_paired = [tensor[indices].clone() for tensor in paired]
    if random_flip:
        flip = torch.rand(sample.shape[0], generator=generator) < 0.5
        for tensor in (sample, *batch_paired):
            tensor[flip] = tensor[flip].flip(-1)
    return (sample * scaling_factor).to(device), [tensor.to(device) for tensor in batch_paired]
