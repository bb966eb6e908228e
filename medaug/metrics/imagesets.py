"""The two image sets an evaluation compares: rows of one split of a dataset folder, read the same way.

A synthetic folder is an ordinary dataset folder, so real and synthetic images go through the same reader
(`medaug.data.load_image`) and the same squaring (`fit_square`) before any extractor sees them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medaug.data import DatasetFolder, fit_square, load_image, read_array

# An RGB file whose channels differ by less than this (mean absolute difference, on a 0..1 scale) is grey
# stored as colour, as generators and many exporters write it.
GREY_TOLERANCE = 0.01


class ImageSetError(ValueError):
    """Two image sets cannot be compared, or one is too small; the message names the folder and flag."""


@dataclass
class ImageSet:
    """Rows of one split (or all rows) of a dataset folder."""

    folder: DatasetFolder
    split: str | None
    indices: list[int]
    flag: str  # the command-line flag that named the folder, for error messages

    @property
    def root(self) -> Path:
        return self.folder.root

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def file_names(self) -> list[str]:
        return [self.folder.value(i, "file_name") for i in self.indices]

    @property
    def labels(self) -> list[str]:
        return [self.folder.value(i, "label") for i in self.indices]

    def describe(self) -> str:
        part = f"split '{self.split}' of " if self.split else ""
        return f"{part}{self.root} ({len(self)} images)"

    def subset(self, positions: list[int]) -> ImageSet:
        return ImageSet(self.folder, self.split, [self.indices[p] for p in positions], self.flag)

    def load(self, position: int, channels: int) -> np.ndarray:
        index = self.indices[position]
        return load_image(self.folder.path(index, "file_name"), channels, self.folder.slice_index(index))


def open_image_set(root: str | Path, split: str | None, flag: str, max_images: int | None = None,
                   seed: int = 0) -> ImageSet:
    """The rows of `split` of the folder at `root` (all rows if None), checked before anything is read.

    With `max_images`, a seeded random subset of that size, so large folders evaluate in bounded time.
    """
    folder = DatasetFolder(root)
    indices = folder.indices(split)
    folder.check(split, read_images=False)
    if max_images is not None and len(indices) > max_images:
        rng = np.random.default_rng(seed)
        indices = sorted(rng.choice(indices, size=max_images, replace=False).tolist())
    return ImageSet(folder, split, indices, flag)


def stored_channels(path: Path, slice_index: int | None = None) -> int:
    """1 for grey images (including RGB files whose channels agree), 3 for colour."""
    array = read_array(path, slice_index)
    if array.ndim == 2 or array.shape[2] in (1, 2):
        return 1
    rgb = array[:, :, :3].astype(np.float32)
    scale = 65535.0 if array.dtype == np.uint16 else 255.0 if array.dtype == np.uint8 else max(1.0, float(rgb.max()))
    spread = np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() / scale
    return 1 if spread < GREY_TOLERANCE else 3


def set_channels(image_set: ImageSet, sample: int = 8) -> tuple[int, str]:
    """Channel count of a set from its first `sample` images, and a file that shows it."""
    found = []
    for position in range(min(sample, len(image_set))):
        index = image_set.indices[position]
        channels = stored_channels(image_set.folder.path(index, "file_name"), image_set.folder.slice_index(index))
        found.append((channels, image_set.folder.value(index, "file_name")))
    colour = [item for item in found if item[0] == 3]
    return colour[0] if colour else found[0]


def check_same_channels(real: ImageSet, synthetic: ImageSet) -> int:
    """The common channel count of both sets, or an error naming both folders and an example file each."""
    real_channels, real_file = set_channels(real)
    synthetic_channels, synthetic_file = set_channels(synthetic)
    if real_channels != synthetic_channels:
        kinds = {1: "1-channel (grey)", 3: "3-channel (colour)"}
        raise ImageSetError(
            f"{real.flag} {real.root} holds {kinds[real_channels]} images (e.g. {real_file}) but "
            f"{synthetic.flag} {synthetic.root} holds {kinds[synthetic_channels]} images (e.g. {synthetic_file}); "
            "features of different channel counts are not comparable: convert one folder to the other's channels")
    return real_channels


def require_images(image_set: ImageSet, needed: int, metric: str, hint: str = "") -> None:
    """Raise, saying how many images `metric` needs, when the set holds fewer."""
    if len(image_set) < needed:
        extra = f" ({hint})" if hint else ""
        raise ImageSetError(
            f"{image_set.flag} {image_set.describe()}: {metric} needs at least {needed} images, "
            f"found {len(image_set)}{extra}")


def iterate_batches(image_set: ImageSet, channels: int, resolution: int, fit: str,
                    batch_size: int) -> Iterator[np.ndarray]:
    """Batches of (B, resolution, resolution, channels) float32 images in [0, 1]."""
    for start in range(0, len(image_set), batch_size):
        stop = min(start + batch_size, len(image_set))
        yield np.stack([fit_square(image_set.load(p, channels), resolution, fit) for p in range(start, stop)])


def load_all(image_set: ImageSet, channels: int, resolution: int, fit: str) -> np.ndarray:
    """All images of a set as one (N, resolution, resolution, channels) float32 array."""
    return np.concatenate(list(iterate_batches(image_set, channels, resolution, fit, batch_size=64)))
