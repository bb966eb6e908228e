"""New mask shapes from the masks a dataset has: affine and elastic deformation, flips, and lesions combined.

Generating images for new masks gives the pairs shapes the real set lacks (GenSeg's and Siamese-Diffusion's idea);
generating only for the real masks adds textures but no new anatomy. Every new mask is checked: it holds a lesion
wherever its source did, the lesion stays inside the image (the deformation may not push it past the border), its
area stays within a factor of the source's, and it has the source's size. A draw that fails is drawn again; a source
that fails every draw is skipped, and the count says so.

`write_mask_dataset` writes the new masks as a dataset folder (each beside its source image fitted to the same
square, with the source row's text and label), so `medaug generate --from_masks` takes it as it takes real masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd


@dataclass(frozen=True)
class MaskAugmentation:
    rotation_degrees: float = 25.0
    scale: tuple[float, float] = (0.75, 1.3)
    shift: float = 0.15  # of the image size
    flip_probability: float = 0.5
    elastic_alpha: float = 0.06  # displacement, as a fraction of the image size
    elastic_sigma: float = 0.08  # smoothness of the displacement field, likewise
    combine_probability: float = 0.15  # add a second lesion, deformed from another mask
    area_range: tuple[float, float] = (0.4, 2.5)  # allowed area ratio to the source
    tries: int = 8


def affine(mask: np.ndarray, rng: np.random.Generator, options: MaskAugmentation) -> np.ndarray:
    size = mask.shape[0]
    angle = rng.uniform(-options.rotation_degrees, options.rotation_degrees)
    scale = rng.uniform(*options.scale)
    rows, cols = np.nonzero(mask)
    centre = (float(cols.mean()), float(rows.mean()))
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    matrix[:, 2] += rng.uniform(-options.shift, options.shift, size=2) * size
    moved = cv2.warpAffine(mask.astype(np.uint8), matrix, (mask.shape[1], mask.shape[0]), flags=cv2.INTER_NEAREST,
                           borderValue=0)
    if rng.random() < options.flip_probability:
        moved = moved[:, ::-1]
    return moved.astype(bool)


def elastic(mask: np.ndarray, rng: np.random.Generator, options: MaskAugmentation) -> np.ndarray:
    """A smooth random displacement field applied with nearest-neighbour sampling."""
    height, width = mask.shape
    sigma = max(1.0, options.elastic_sigma * width)
    alpha = options.elastic_alpha * width
    fields = [cv2.GaussianBlur(rng.uniform(-1, 1, (height, width)).astype(np.float32), (0, 0), sigma)
              for _ in range(2)]
    fields = [field / (np.abs(field).max() + 1e-8) * alpha for field in fields]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    warped = cv2.remap(mask.astype(np.uint8), grid_x + fields[0], grid_y + fields[1], cv2.INTER_NEAREST,
                       borderValue=0)
    return warped.astype(bool)


def acceptable(new: np.ndarray, source: np.ndarray, options: MaskAugmentation, combined: bool = False) -> bool:
    """Same size, a lesion where the source had one, none touching the border, area within the allowed range
    (twice the upper bound when a second lesion was added)."""
    if new.shape != source.shape or not new.any():
        return False
    if new[0].any() or new[-1].any() or new[:, 0].any() or new[:, -1].any():
        return False
    ratio = new.sum() / max(1, source.sum())
    return options.area_range[0] <= ratio <= options.area_range[1] * (2 if combined else 1)


def new_mask(source: np.ndarray, others: list[np.ndarray], rng: np.random.Generator,
             options: MaskAugmentation = MaskAugmentation()) -> np.ndarray | None:
    """A deformed copy of `source` (a lesion from `others` sometimes added), or None when every try failed."""
    source = np.asarray(source, dtype=bool)
    if not source.any():
        return None
    for _ in range(options.tries):
        candidate = elastic(affine(source, rng, options), rng, options)
        combined = bool(others) and rng.random() < options.combine_probability
        if combined:
            other = others[int(rng.integers(len(others)))]
            if other.shape == source.shape and other.any():
                candidate = candidate | elastic(affine(other, rng, options), rng, options)
        if acceptable(candidate, source, options, combined):
            return candidate
    return None


def write_mask_dataset(source_dir: str | Path, output_dir: str | Path, per_mask: int, resolution: int,
                       seed: int = 0, split: str = "train", fit: str = "pad",
                       options: MaskAugmentation = MaskAugmentation()) -> dict:
    """`per_mask` new masks for every lesion mask of `split`, as a dataset folder; returns counts."""
    from medaug.data import DatasetFolder, fit_square, load_image, load_mask
    from medaug.synthetic import write_array_png

    folder = DatasetFolder(source_dir)
    output_dir = Path(output_dir)
    rows = [i for i in folder.indices(split) if folder.path(i, "mask_file_name") is not None]
    masks = {i: fit_square(load_mask(folder.path(i, "mask_file_name"), folder.slice_index(i)), resolution, fit,
                           nearest=True).astype(bool) for i in rows}
    lesions = [i for i in rows if masks[i].any()]
    rng = np.random.default_rng(seed)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    (output_dir / "masks").mkdir(parents=True, exist_ok=True)
    records, skipped = [], 0
    for index in lesions:
        image = fit_square(load_image(folder.path(index, "file_name"), 1, folder.slice_index(index)), resolution, fit)
        pixels = np.round(image[:, :, 0] * 255).astype(np.uint8)
        for number in range(per_mask):
            mask = new_mask(masks[index], [masks[i] for i in lesions if i != index], rng, options)
            if mask is None:
                skipped += 1
                continue
            # One image file per row: a dataset folder refuses a file listed twice.
            image_name, mask_name = f"images/{index:05d}_{number:02d}.png", f"masks/{index:05d}_{number:02d}.png"
            write_array_png(pixels, output_dir / image_name)
            write_array_png(mask.astype(np.uint8) * 255, output_dir / mask_name)
            records.append({"file_name": image_name, "mask_file_name": mask_name, "split": "train",
                            "text": folder.value(index, "text"), "label": folder.value(index, "label"),
                            "source_file_name": folder.value(index, "file_name")})
    pd.DataFrame(records).to_csv(output_dir / "metadata.csv", index=False)
    return {"sources": len(lesions), "masks": len(records), "skipped_draws": skipped}
