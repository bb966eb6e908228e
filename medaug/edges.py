"""Edge maps for ControlNet conditioning: array functions, MONAI-style transforms, and edge dataset folders.

Array functions take a float image in [0, 1], (H, W) or (H, W, C), and/or a boolean (H, W) mask, and return
a float32 (H, W) edge map in [0, 1]. `EDGE_METHODS` is the one registry; `edge_map` dispatches on it.
`write_edge_dataset` turns a dataset folder into a self-contained one whose rows name their edge maps in
`conditioning_image_file_name`, as 8-bit RGB PNGs (the diffusers ControlNet pipeline converts control
images to RGB, so ControlNet trains on 3 equal channels).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from medaug.data.folder import METADATA_NAMES
from medaug.outputs import refuse_foreign_entries, refuse_input_folder

MASK_METHODS = ("mask_boundary", "mask_filled", "fused")
# Options each method accepts; `edge_map` refuses others by name instead of failing deep inside OpenCV.
METHOD_OPTIONS = {
    "canny": ("low", "high", "sigma"),
    "sobel": (),
    "scharr": (),
    "mask_boundary": ("thickness",),
    "mask_filled": (),
    "fused": ("image_method", "thickness", "low", "high", "sigma"),
}
# Where write_edge_dataset puts each path column's files, relative to the output folder.
COPIED_COLUMNS = {"file_name": "images", "mask_file_name": "masks", "embedding_file_name": "embeddings"}
EDGE_FOLDER = "edges"


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grey from a float image in [0, 1], (H, W) or (H, W, C)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        from medaug.data import to_channels

        image = to_channels(image, 1)[:, :, 0]
    if image.ndim != 2:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, C), got {image.shape}")
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def median_thresholds(image: np.ndarray, sigma: float = 0.33) -> tuple[float, float]:
    """Canny thresholds (8-bit grey levels) at (1 - sigma) and (1 + sigma) times the image's median."""
    median = float(np.median(_grey_uint8(image)))
    return max(0.0, (1.0 - sigma) * median), min(255.0, (1.0 + sigma) * median)


def canny_edges(image: np.ndarray, low: float | None = None, high: float | None = None,
                sigma: float = 0.33) -> np.ndarray:
    """OpenCV Canny on 8-bit grey; thresholds (0..255) default to `median_thresholds(image, sigma)`."""
    auto_low, auto_high = median_thresholds(image, sigma)
    low = auto_low if low is None else float(low)
    high = auto_high if high is None else float(high)
    if low > high:
        raise ValueError(f"canny: low threshold {low} is above high threshold {high}")
    return (cv2.Canny(_grey_uint8(image), low, high) > 0).astype(np.float32)


def _gradient_magnitude(image: np.ndarray, derivative: Callable) -> np.ndarray:
    grey = _grey_uint8(image).astype(np.float32) / 255.0
    dx = derivative(grey, cv2.CV_32F, 1, 0)
    dy = derivative(grey, cv2.CV_32F, 0, 1)
    magnitude = cv2.magnitude(dx, dy)
    peak = float(magnitude.max())
    return (magnitude / peak if peak > 0 else magnitude).astype(np.float32)


def sobel_edges(image: np.ndarray) -> np.ndarray:
    """3x3 Sobel gradient magnitude, divided by its maximum (all zeros on a flat image)."""
    return _gradient_magnitude(image, lambda grey, depth, x, y: cv2.Sobel(grey, depth, x, y, ksize=3))


def scharr_edges(image: np.ndarray) -> np.ndarray:
    """Scharr gradient magnitude (more rotation-invariant than Sobel), divided by its maximum."""
    return _gradient_magnitude(image, cv2.Scharr)


def mask_boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Mask pixels within `thickness` (8-connected) steps of the background; the image border is not background."""
    if thickness < 1:
        raise ValueError(f"mask_boundary: thickness must be at least 1, got {thickness}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_boundary: expected a (H, W) mask, got shape {mask.shape}")
    inside = (mask > 0).astype(np.uint8)
    kernel = np.ones((3, 3), dtype=np.uint8)
    interior = cv2.erode(inside, kernel, iterations=int(thickness))
    return (inside - interior).astype(np.float32)


def mask_filled(mask: np.ndarray) -> np.ndarray:
    """The whole mask as the control image (1 inside the lesion): region, not outline, for a ControlNet to follow."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_filled: expected a (H, W) mask, got shape {mask.shape}")
    return (mask > 0).astype(np.float32)


def fused_edges(image: np.ndarray, mask: np.ndarray, method: str = "canny", thickness: int = 1,
                **options) -> np.ndarray:
    """Image edges (by `method`, with `options`) and the mask's boundary, pixelwise maximum (as DiffBoost)."""
    if method in MASK_METHODS or method not in EDGE_METHODS:
        image_methods = [name for name in EDGE_METHODS if name not in MASK_METHODS]
        raise ValueError(f"fused: image method '{method}' is not one of {', '.join(image_methods)}")
    edges = edge_map(method, image, **options)
    boundary = mask_boundary(mask, thickness)
    if edges.shape != boundary.shape:
        raise ValueError(f"fused: mask shape {boundary.shape} differs from the image's {edges.shape}")
    return np.maximum(edges, boundary)


EDGE_METHODS: dict[str, Callable[..., np.ndarray]] = {
    "canny": canny_edges,
    "sobel": sobel_edges,
    "scharr": scharr_edges,
    "mask_boundary": mask_boundary,
    "mask_filled": mask_filled,
    "fused": fused_edges,
}


def check_method(method: str, mask_given: bool = True, **options) -> None:
    """Raise ValueError naming an unknown method, an option it does not take, or a mask it lacks."""
    if method not in EDGE_METHODS:
        raise ValueError(f"unknown edge method '{method}'; expected one of {', '.join(EDGE_METHODS)}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ValueError(f"edge method '{method}' takes no option {', '.join(unknown)}")
    if method in MASK_METHODS and not mask_given:
        raise ValueError(f"edge method '{method}' needs a mask")


def edge_map(method: str, image: np.ndarray | None, mask: np.ndarray | None = None, **options) -> np.ndarray:
    """The edge map of `image` (and `mask`, for mask_boundary and fused) by a method of `EDGE_METHODS`."""
    check_method(method, mask is not None, **options)
    if method == "mask_boundary":
        return mask_boundary(np.asarray(mask), **options)
    if method == "mask_filled":
        return mask_filled(mask)
    if method == "fused":
        image_method = options.pop("image_method", "canny")
        return fused_edges(image, np.asarray(mask), image_method, **options)
    return EDGE_METHODS[method](image, **options)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensors and MONAI MetaTensors
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _build_transforms() -> dict[str, type]:
    """The MONAI transform classes; built on first use because importing monai.transforms takes seconds."""
    from monai.transforms import MapTransform, Transform
    from monai.utils import ensure_tuple_rep

    class EdgeMap(Transform):
        """Array transform: `EdgeMap(method, **options)(image, mask=None)` is `edge_map(method, image, mask, ...)`."""

        def __init__(self, method: str = "canny", **options):
            check_method(method, **options)
            self.method = method
            self.options = options

        def __call__(self, image, mask=None) -> np.ndarray:
            image = None if image is None else _to_numpy(image)
            mask = None if mask is None else _to_numpy(mask)
            return edge_map(self.method, image, mask, **dict(self.options))

    class EdgeMapd(MapTransform):
        """Dictionary transform: writes the edge map of each key under its output key and touches nothing else."""

        def __init__(self, keys=("image",), method: str = "canny", mask_key: str = "mask",
                     output_key="conditioning_image", allow_missing_keys: bool = False, **options):
            super().__init__(keys, allow_missing_keys)
            self.edge = EdgeMap(method, **options)
            self.mask_key = mask_key
            self.output_keys = ensure_tuple_rep(output_key, len(self.keys))
            if len(set(self.output_keys)) != len(self.output_keys):
                raise ValueError(f"EdgeMapd: {len(self.keys)} keys need as many distinct output keys")

        def __call__(self, data):
            result = dict(data)
            mask = data.get(self.mask_key) if self.edge.method in MASK_METHODS else None
            if self.edge.method in MASK_METHODS and mask is None:
                raise ValueError(f"EdgeMapd: method '{self.edge.method}' needs a mask under key '{self.mask_key}'")
            for key, output_key in self.key_iterator(result, self.output_keys):
                result[output_key] = self.edge(result[key], mask)
            return result

    for cls in (EdgeMap, EdgeMapd):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # so pickling finds them
    return {"EdgeMap": EdgeMap, "EdgeMapd": EdgeMapd}


_TRANSFORMS: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("EdgeMap", "EdgeMapd"):
        if not _TRANSFORMS:
            _TRANSFORMS.update(_build_transforms())
        return _TRANSFORMS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def edge_file_name(file_name: str, slice_index: int | None) -> str:
    """Where a row's edge map goes, relative to the output folder; one file per image and slice."""
    stem = file_name if slice_index is None else f"{file_name}_s{slice_index}"
    return f"{EDGE_FOLDER}/{stem if stem.lower().endswith('.png') else stem + '.png'}"


def _prepare_output(dataset_root: Path, output_dir: Path, overwrite: bool) -> None:
    refuse_input_folder(output_dir, {"DATASET_DIR": dataset_root})
    existing = [output_dir / name for name in METADATA_NAMES if (output_dir / name).exists()]
    if not existing:  # no dataset of an earlier run here: the folder must hold nothing of the user's
        refuse_foreign_entries(output_dir, "medaug")
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a dataset ({existing[0].name}); "
                              "choose another folder or pass overwrite")
    for path in existing:
        path.unlink()  # a stale metadata.jsonl beside the new metadata.csv would make the folder ambiguous
    output_dir.mkdir(parents=True, exist_ok=True)


def _check_masks(folder, rows: list[int], method: str) -> None:
    if method in MASK_METHODS:
        folder.require_filled("mask_file_name", rows, f"edge method '{method}' needs masks; the column is missing",
                              f"edge method '{method}' needs a mask; this row has none")


def _atomic_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _write_edge_png(edges: np.ndarray, target: Path) -> None:
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    grey = np.round(np.clip(edges, 0.0, 1.0) * 255.0).astype(np.uint8)
    partial = target.with_name(f".{target.name}.partial")
    Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB").save(partial, format="PNG")
    os.replace(partial, target)


def _row_edges(folder, index: int, method: str, options: dict) -> np.ndarray:
    from medaug.data import load_image, load_mask

    slice_index = folder.slice_index(index)
    image = load_image(folder.path(index, "file_name"), 1, slice_index)[:, :, 0]
    mask_path = folder.path(index, "mask_file_name")
    mask = None if mask_path is None or method not in MASK_METHODS else load_mask(mask_path, slice_index)
    if mask is not None and mask.shape != image.shape:
        raise ValueError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
                         f"{image.shape[1]}x{image.shape[0]} (width x height)")
    return edge_map(method, image, mask, **options)


def to_control_image(edges: np.ndarray) -> np.ndarray:
    """(H, W) edge map -> (H, W, 3) float32 in [0, 1], the 3 equal channels ControlNet trains and samples on."""
    edges = np.clip(np.asarray(edges, dtype=np.float32), 0.0, 1.0)
    return np.repeat(edges[:, :, None], 3, axis=2) if edges.ndim == 2 else edges


def row_control_image(folder, index: int, resolution: int, fit: str = "pad", method: str | None = None,
                      column: str = "conditioning_image_file_name", **options) -> np.ndarray:
    """A row's ControlNet input at `resolution`: (R, R, 3) float32 in [0, 1].

    With `method`, edges are computed from the row's image (and mask) after both are fitted to the square
    exactly as training fits them, so line widths are in model pixels whatever the source size; without it
    the precomputed edge map in `column` is read and fitted. Training and generation both call this.
    """
    from medaug.data import load_image, load_mask
    from medaug.data.dataset import fit_square

    slice_index = folder.slice_index(index)
    if method is None:
        edges = load_image(folder.path(index, column), 3, slice_index)
        return to_control_image(fit_square(edges, resolution, fit)[:, :, 0])
    image = fit_square(load_image(folder.path(index, "file_name"), 1, slice_index), resolution, fit)[:, :, 0]
    mask = None
    if method in MASK_METHODS:
        mask_path = folder.path(index, "mask_file_name")
        if mask_path is None:
            raise ValueError(f"{folder.metadata_path}: row {index + 1} ({folder.value(index, 'file_name')}) has "
                             f"no mask_file_name; edge method '{method}' needs one")
        mask = fit_square(load_mask(mask_path, slice_index), resolution, fit, nearest=True)
    return to_control_image(edge_map(method, image, mask, **options))


def write_edge_dataset(dataset_dir: str | Path, output_dir: str | Path, method: str, split: str | None = None,
                       progress: Callable[[int], None] | None = None, overwrite: bool = False,
                       **options) -> Path:
    """Write a self-contained dataset folder: copies of the images (and masks, embeddings), edge maps under
    `edges/`, and `metadata.csv` with `conditioning_image_file_name` filled and every path relative to it.

    Refuses an `output_dir` that already holds a dataset unless `overwrite`; every file is written under a
    temporary name and renamed, and metadata.csv comes last, so an interrupted run leaves no dataset behind.
    """
    from medaug.data import DatasetFolder

    folder = DatasetFolder(dataset_dir)
    check_method(method, True, **options)
    rows = folder.indices(split)
    _check_masks(folder, rows, method)
    output_dir = Path(output_dir)
    _prepare_output(folder.root, output_dir, overwrite)
    table = folder.table.loc[rows].reset_index(drop=True).copy()
    edge_names = []
    for position, index in enumerate(rows):
        for column, subfolder in COPIED_COLUMNS.items():
            source = folder.path(index, column)
            if source is not None:
                relative = f"{subfolder}/{folder.value(index, column)}"
                _atomic_copy(source, output_dir / relative)
                table.at[position, column] = relative
        edge_names.append(edge_file_name(folder.value(index, "file_name"), folder.slice_index(index)))
        _write_edge_png(_row_edges(folder, index, method, options), output_dir / edge_names[-1])
        if progress is not None:
            progress(1)
    table["conditioning_image_file_name"] = edge_names
    partial = output_dir / ".metadata.csv.partial"
    table.to_csv(partial, index=False)
    os.replace(partial, output_dir / "metadata.csv")
    return output_dir
