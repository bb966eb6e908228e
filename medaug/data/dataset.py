"""A torch `Dataset` of dict samples over one split of a dataset folder, at one square resolution."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from medaug.data.folder import DatasetFolder
from medaug.data.loading import load_image, load_mask

FIT_MODES = ("pad", "crop", "stretch")


def fit_square(array: np.ndarray, resolution: int, fit: str = "pad", nearest: bool = False) -> np.ndarray:
    """Resize an (H, W[, C]) array to (resolution, resolution[, C]).

    `pad` keeps the whole field of view and pads the short side with zeros (a lesion at the edge survives);
    `crop` scales the short side to `resolution` and cuts the centre; `stretch` ignores the aspect ratio.
    `nearest` keeps label values intact (masks).
    """
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}, got '{fit}'")
    height, width = array.shape[:2]
    if fit == "stretch":
        return _resize(array, resolution, resolution, nearest)
    scale = resolution / (max(height, width) if fit == "pad" else min(height, width))
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = _resize(array, new_height, new_width, nearest)
    if fit == "crop":
        top, left = (new_height - resolution) // 2, (new_width - resolution) // 2
        return resized[top:top + resolution, left:left + resolution]
    padded = np.zeros((resolution, resolution) + resized.shape[2:], dtype=resized.dtype)
    top, left = (resolution - new_height) // 2, (resolution - new_width) // 2
    padded[top:top + new_height, left:left + new_width] = resized
    return padded


def _resize(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    if nearest:
        interpolation = cv2.INTER_NEAREST
    elif height < array.shape[0]:
        interpolation = cv2.INTER_AREA  # anti-aliased downscaling
    else:
        interpolation = cv2.INTER_CUBIC
    source = array.astype(np.uint8) if array.dtype == np.bool_ else array
    resized = cv2.resize(source, (width, height), interpolation=interpolation)
    if array.ndim == 3 and resized.ndim == 2:  # OpenCV drops a single channel axis
        resized = resized[:, :, None]
    if not nearest:
        resized = np.clip(resized, 0.0, 1.0)
    return resized.astype(array.dtype)


class MedicalImageDataset(Dataset):
    """Samples of one split as dicts.

    Keys: `pixel_values` (C, R, R) float in `value_range` ([-1, 1] by default, what Stable Diffusion's VAE
    expects), `text`, `label`, `file_name`, `index`; with `with_masks`, also `mask` (1, R, R) of 0/1 and
    `has_mask` (rows without a mask get an empty one). The folder is checked when the dataset is made, so
    bad files stop a run before training starts.
    """

    def __init__(
        self,
        folder: DatasetFolder | str | Path,
        split: str | None = "train",
        resolution: int = 64,
        channels: int = 3,
        fit: str = "pad",
        with_masks: bool = False,
        value_range: tuple[float, float] = (-1.0, 1.0),
        caption_column: str = "text",
        validate: bool = True,
    ):
        self.folder = folder if isinstance(folder, DatasetFolder) else DatasetFolder(folder)
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got '{fit}'")
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        self.indices = self.folder.indices(split)
        if validate:
            self.folder.check(split)
        self.split = split
        self.resolution = resolution
        self.channels = channels
        self.fit = fit
        self.with_masks = with_masks
        self.value_range = value_range
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        folder = self.folder
        slice_index = folder.slice_index(index)
        image = load_image(folder.path(index, "file_name"), self.channels, slice_index)
        image = fit_square(image, self.resolution, self.fit)
        low, high = self.value_range
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))) * (high - low) + low
        sample = {
            "pixel_values": pixels,
            "text": folder.value(index, self.caption_column),
            "label": folder.value(index, "label"),
            "file_name": folder.value(index, "file_name"),
            "index": index,
        }
        if self.with_masks:
            sample.update(self._mask(index, slice_index))
        return sample

    def _mask(self, index: int, slice_index: int | None) -> dict:
        mask_path = self.folder.path(index, "mask_file_name")
        if mask_path is None:
            mask = np.zeros((self.resolution, self.resolution), dtype=np.float32)
        else:
            mask = fit_square(load_mask(mask_path, slice_index), self.resolution, self.fit, nearest=True)
        return {"mask": torch.from_numpy(mask.astype(np.float32))[None], "has_mask": mask_path is not None}
