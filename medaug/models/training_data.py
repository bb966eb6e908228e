"""What train_autoencoder.py and train_gan.py train on and show: a split's images held in memory with what their
`--condition` reads (masks, or class indices of the `label` column), batches of them, and validation grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medaug.data import DatasetError, DatasetFolder, MedicalImageDataset, Problem

LABEL_COLUMN = "label"


@dataclass
class TrainingTensors:
    images: torch.Tensor  # (N, C, R, R) in [-1, 1]
    masks: torch.Tensor | None  # (N, 1, R, R) in {0, 1}, with --condition mask
    class_indices: torch.Tensor | None  # (N,) with --condition class
    class_names: list[str]


def require_condition_column(folder: DatasetFolder, rows: list[int], condition: str) -> None:
    """Refuse, naming the column and the rows, training rows that lack what `--condition` reads."""
    column = {"mask": "mask_file_name", "class": LABEL_COLUMN}.get(condition)
    if column is None:
        return
    what = "a mask" if condition == "mask" else "a class label"
    folder.require_filled(column, rows,
                          f"the column is missing; --condition {condition} needs {what} for every training row",
                          f"--condition {condition} needs this row's {column}; it is empty")


def class_names(folder: DatasetFolder, rows: list[int]) -> list[str]:
    names = sorted({folder.value(i, LABEL_COLUMN) for i in rows})
    if len(names) < 2:
        raise DatasetError(folder.metadata_path, [Problem(f"--condition class needs two or more classes among the "
                                                          f"training rows, found {names}", column=LABEL_COLUMN)])
    return names


def load_training_tensors(folder: DatasetFolder, split: str, rows: list[int], resolution: int, channels: int,
                          fit: str, condition: str) -> TrainingTensors:
    """The rows' images fitted to the square, with their masks or classes as `condition` needs; every file and
    the condition's column are checked before anything is read."""
    require_condition_column(folder, rows, condition)
    names = class_names(folder, rows) if condition == "class" else []
    dataset = MedicalImageDataset(folder, split=split, resolution=resolution, channels=channels, fit=fit,
                                  with_masks=condition == "mask")
    dataset.indices = rows
    items = [dataset[i] for i in range(len(dataset))]
    masks = torch.stack([item["mask"] for item in items]) if condition == "mask" else None
    indices = torch.tensor([names.index(folder.value(i, LABEL_COLUMN)) for i in rows]) if names else None
    return TrainingTensors(torch.stack([item["pixel_values"] for item in items]), masks, indices, names)


def training_batch(tensors: TrainingTensors, indices: list[int], generator: torch.Generator, random_flip: bool,
                   device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(images, masks or None, class indices or None) of `indices`, flipped left-right together at random."""
    images = tensors.images[indices].clone()
    masks = tensors.masks[indices].clone() if tensors.masks is not None else None
    if random_flip:
        flip = torch.rand(len(indices), generator=generator) < 0.5
        images[flip] = images[flip].flip(-1)
        if masks is not None:
            masks[flip] = masks[flip].flip(-1)
    classes = tensors.class_indices[indices] if tensors.class_indices is not None else None
    return images.to(device), None if masks is None else masks.to(device), \
        None if classes is None else classes.to(device)


def validation_conditions(folder: DatasetFolder, split: str, count: int, resolution: int, fit: str, condition: str,
                          names: list[str]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(how many images, masks or None, class indices or None) a validation grid draws: the masks of the first
    val rows (or of `split` without val rows), the classes in turn, or `count` unconditional images."""
    from medaug.training.conditions import validation_rows
    from medaug.training.mask_channels import row_masks

    if condition == "mask":
        rows = [i for i in validation_rows(folder, split, count) if folder.path(i, "mask_file_name") is not None]
        if not rows:
            rows = [i for i in folder.indices(split) if folder.path(i, "mask_file_name") is not None][:count]
        return len(rows), row_masks(folder, rows, resolution, fit), None
    if condition == "class":
        return count, None, torch.arange(count) % len(names)
    return count, None, None


def save_validation_grid(images: torch.Tensor, masks: torch.Tensor | None, path: str | Path) -> Path:
    """Images in [-1, 1] as a PNG grid, each below its mask where there are masks."""
    from medaug.training.validation import save_grid

    def to_rgb(tensor: torch.Tensor) -> np.ndarray:
        array = tensor.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        return np.repeat(array, 3 // array.shape[3], axis=3)

    pictures = to_rgb(((images + 1) / 2).clamp(0, 1))
    if masks is not None:
        pictures = np.concatenate([to_rgb(masks), pictures], axis=1)
    return save_grid(pictures, path)


@torch.no_grad()
def log_validation(args, step: int, model, folder: DatasetFolder, class_names: list[str]) -> Path:
    """A grid of --num_validation_images samples of a GAN generator or autoencoder (anything with draw_vectors and
    decode) for the val split's masks or classes, written to OUTPUT_DIR/validation/step-N.png."""
    count, masks, classes = validation_conditions(folder, args.split, args.num_validation_images, args.resolution,
                                                  args.fit, args.condition, class_names)
    vectors = model.draw_vectors(count, torch.Generator().manual_seed(args.seed))
    images = model.eval().decode(vectors, None if masks is None else masks.to(model.device), classes)
    model.train()
    return save_validation_grid(images, masks, Path(args.output_dir) / "validation" / f"step-{step:06d}.png")


def generator_run_record(args, generator: str, channels: int, class_names: list[str], global_step: int):
    """The run record of a generator family trained from nothing by `medaug.scripts.train_<generator>` (always
    fp32, no base model)."""
    from medaug.run_record import RunRecord

    return RunRecord(base_model="", resolution=args.resolution, script=f"train_{generator}", conditioning="none",
                     unet_train_mode="none", fit=args.fit, channels=channels, generator=generator,
                     generator_condition=args.condition, class_names=class_names,
                     train_data_dir=str(Path(args.train_data_dir).resolve()), split=args.split, steps=global_step,
                     seed=args.seed, mixed_precision="no", arguments=vars(args))
