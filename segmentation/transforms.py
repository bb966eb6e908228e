"""MONAI-style transforms for the benchmarks: an array transform and a dictionary version ending in `d`.

Images and masks are read by `medaug.data.load_image` / `load_mask` (one reader for both, so a pair never
ends up transposed or flipped relative to each other, which MONAI's own `LoadImage` would do to PNGs) and
made square by `medaug.data.fit_square`. Everything after loading is MONAI's own transforms, except CLAHE
and chessboard cut-outs, which MONAI lacks.

A data item is a dict: `image` (path), `mask` (path, or '' for an empty mask), `slice_index` (-1 for none),
`label` (class index, -1 for none), `file_name`, `origin` ('real' or 'synthetic').
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import cv2
import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandCoarseDropoutd,
    RandFlipd,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotated,
    Transform,
)

from medaug.data import fit_square, load_image, load_mask


class LoadMedical(Transform):
    """Read an image as float32 (C, H, W) in [0, 1], or a mask as float32 (1, H, W) of 0/1."""

    def __init__(self, channels: int = 1, is_mask: bool = False):
        self.channels = channels
        self.is_mask = is_mask

    def __call__(self, path: str, slice_index: int | None = None) -> np.ndarray:
        if self.is_mask:
            return load_mask(path, slice_index).astype(np.float32)[None]
        image = load_image(path, self.channels, slice_index)
        return np.ascontiguousarray(image.transpose(2, 0, 1))


class LoadMedicald(MapTransform):
    """Load `image_key` and `mask_keys` of an item; an empty mask path gives an all-zero mask of the image size."""

    def __init__(self, image_key: str = "image", mask_keys: Sequence[str] = (), channels: int = 1,
                 slice_key: str = "slice_index"):
        super().__init__([image_key, *mask_keys])
        self.image_key = image_key
        self.mask_keys = tuple(mask_keys)
        self.slice_key = slice_key
        self.load_image = LoadMedical(channels)
        self.load_mask = LoadMedical(is_mask=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        item = dict(data)
        slice_index = item.get(self.slice_key, -1)
        slice_index = None if slice_index is None or int(slice_index) < 0 else int(slice_index)
        item[self.image_key] = self.load_image(item[self.image_key], slice_index)
        for key in self.mask_keys:
            path = item.get(key) or ""
            if path:
                item[key] = self.load_mask(path, slice_index)
            else:
                item[key] = np.zeros((1, *item[self.image_key].shape[1:]), dtype=np.float32)
        return item


class FitSquare(Transform):
    """Resize a (C, H, W) array to (C, R, R) by `medaug.data.fit_square` (pad, crop or stretch)."""

    def __init__(self, resolution: int, fit: str = "pad", nearest: bool = False):
        self.resolution = resolution
        self.fit = fit
        self.nearest = nearest

    def __call__(self, array: np.ndarray) -> np.ndarray:
        resized = fit_square(array.transpose(1, 2, 0), self.resolution, self.fit, nearest=self.nearest)
        if resized.ndim == 2:
            resized = resized[:, :, None]
        return np.ascontiguousarray(resized.transpose(2, 0, 1))


class FitSquared(MapTransform):
    """`FitSquare` on `keys`; keys in `nearest_keys` (masks) keep their label values."""

    def __init__(self, keys: Sequence[str], resolution: int, fit: str = "pad", nearest_keys: Sequence[str] = ()):
        super().__init__(keys)
        self.smooth = FitSquare(resolution, fit)
        self.nearest = FitSquare(resolution, fit, nearest=True)
        self.nearest_keys = set(nearest_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        item = dict(data)
        for key in self.key_iterator(item):
            item[key] = (self.nearest if key in self.nearest_keys else self.smooth)(item[key])
        return item


class RandClahe(RandomizableTransform):
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a (C, H, W) image in [0, 1], per channel."""

    def __init__(self, prob: float = 0.3, clip_limit: tuple[float, float] = (1.0, 3.0), tiles: int = 8):
        RandomizableTransform.__init__(self, prob)
        self.clip_limit = clip_limit
        self.tiles = tiles
        self._clip = clip_limit[0]

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self._clip = float(self.R.uniform(*self.clip_limit))

    def __call__(self, image, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        array = _as_numpy(image)
        clahe = cv2.createCLAHE(clipLimit=self._clip, tileGridSize=(self.tiles, self.tiles))
        eight_bit = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
        equalised = np.stack([clahe.apply(channel) for channel in eight_bit]).astype(np.float32) / 255.0
        return _like(equalised, image)


class RandClahed(MapTransform, RandomizableTransform):
    """`RandClahe` on `keys` (images only: a mask has no contrast)."""

    def __init__(self, keys: Sequence[str], prob: float = 0.3, clip_limit: tuple[float, float] = (1.0, 3.0)):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.clahe = RandClahe(prob=1.0, clip_limit=clip_limit)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.clahe.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        item = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return item
        self.clahe.randomize()
        for key in self.key_iterator(item):
            item[key] = self.clahe(item[key], randomize=False)
        return item


class RandChessboardCutout(RandomizableTransform):
    """Erase the dark squares of a chessboard laid over the image, each with probability `fraction`.

    The cell size is drawn from `cell_range` (as fractions of the image side) and the board is shifted at
    random, so the erased pattern differs every time; erased pixels take `fill_value`.
    """

    def __init__(self, prob: float = 0.2, cell_range: tuple[float, float] = (0.08, 0.2),
                 fraction: float = 0.5, fill_value: float = 0.0):
        RandomizableTransform.__init__(self, prob)
        self.cell_range = cell_range
        self.fraction = fraction
        self.fill_value = fill_value
        self._keep: np.ndarray | None = None

    def randomize_for(self, height: int, width: int) -> None:
        super().randomize(None)
        cell = max(1, round(self.R.uniform(*self.cell_range) * min(height, width)))
        offset_y, offset_x = self.R.randint(0, cell, size=2)
        rows = (np.arange(height) + offset_y) // cell
        cols = (np.arange(width) + offset_x) // cell
        board_rows, board_cols = rows[-1] + 1, cols[-1] + 1
        dark = (np.add.outer(np.arange(board_rows), np.arange(board_cols)) % 2) == 1
        chosen = dark & (self.R.uniform(size=dark.shape) < self.fraction)
        self._keep = ~chosen[rows][:, cols]

    def __call__(self, image, randomize: bool = True):
        array = _as_numpy(image)
        if randomize:
            self.randomize_for(*array.shape[-2:])
        if not self._do_transform or self._keep is None:
            return image
        erased = np.where(self._keep[None], array, np.float32(self.fill_value)).astype(np.float32)
        return _like(erased, image)


class RandChessboardCutoutd(MapTransform, RandomizableTransform):
    """`RandChessboardCutout` on `keys`, with one board for all of them."""

    def __init__(self, keys: Sequence[str], prob: float = 0.2, cell_range: tuple[float, float] = (0.08, 0.2),
                 fraction: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.cutout = RandChessboardCutout(prob=1.0, cell_range=cell_range, fraction=fraction)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cutout.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        item = dict(data)
        self.randomize(None)
        keys = list(self.key_iterator(item))
        if not self._do_transform or not keys:
            return item
        self.cutout.randomize_for(*_as_numpy(item[keys[0]]).shape[-2:])
        for key in keys:
            item[key] = self.cutout(item[key], randomize=False)
        return item


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _like(array: np.ndarray, reference):
    """Return `array` as the same kind of container as `reference` (numpy array or torch tensor)."""
    if hasattr(reference, "detach"):
        import torch

        return torch.as_tensor(array, dtype=reference.dtype, device=reference.device)
    return array


def load_transforms(resolution: int, channels: int, fit: str, with_masks: bool) -> list:
    """The deterministic head of every pipeline (what `CacheDataset` caches): read, then make square."""
    mask_keys = ("mask",) if with_masks else ()
    return [
        LoadMedicald("image", mask_keys, channels=channels),
        FitSquared(("image", *mask_keys), resolution, fit, nearest_keys=mask_keys),
    ]


def classical_augmentation(resolution: int, with_masks: bool) -> list:
    """CLAHE, Gaussian blur, left-right flip, small rotation, random erasing and chessboard cut-outs.

    Spatial transforms move image and mask together (the mask with nearest-neighbour sampling); intensity
    transforms and erasing touch the image only, as an erased lesion is still a lesion. Up-down flips are
    left out: depth has a direction in ultrasound and X-ray.
    """
    spatial_keys = ("image", "mask") if with_masks else ("image",)
    modes = ("bilinear", "nearest") if with_masks else ("bilinear",)
    hole = max(2, resolution // 8)
    return [
        RandClahed("image", prob=0.3),
        RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.2),
        RandFlipd(spatial_keys, spatial_axis=1, prob=0.5),
        RandRotated(spatial_keys, range_x=math.radians(15), prob=0.3, mode=modes, padding_mode="zeros"),
        RandCoarseDropoutd("image", holes=1, max_holes=4, spatial_size=hole, max_spatial_size=2 * hole,
                           fill_value=0.0, prob=0.3),
        RandChessboardCutoutd("image", prob=0.2),
    ]


def light_augmentation(with_masks: bool) -> list:
    """Left-right flips of image and mask together: what any practitioner's baseline has."""
    return [RandFlipd(("image", "mask") if with_masks else ("image",), spatial_axis=1, prob=0.5)]


AUGMENTATIONS = ("none", "light", "classical")


def build_transforms(resolution: int, channels: int, fit: str, with_masks: bool, augment: str) -> Compose:
    """Load + fit, then the augmentation policy (`none`, `light` flips, or the `classical` policy, which
    includes the flips), then tensors."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augmentation: one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    keys = ("image", "mask") if with_masks else ("image",)
    steps = load_transforms(resolution, channels, fit, with_masks)
    if augment == "light":
        steps += light_augmentation(with_masks)
    elif augment == "classical":
        steps += classical_augmentation(resolution, with_masks)
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)
