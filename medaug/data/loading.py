"""Reading image files into arrays: the one place pixels enter medaug.

Images and masks go through the same reader (`read_array`), so orientation and size always agree.
`load_image` then rescales to float32 in [0, 1] (16-bit and float data by their own range, before any
8-bit conversion) and `to_channels` is the single place that converts between 1 and 3 channels.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Pixels (per slice or frame) an image may have before it is decoded: a few-kilobyte PNG can claim 15000 x 15000
# pixels and need gigabytes once decoded. Change it with the environment variable below.
MAX_PIXELS_VARIABLE = "MEDAUG_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file."""


def image_format(path: str | Path) -> str:
    """Return 'raster', 'dicom' or 'nifti' from the file name, or raise naming the file."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    if _has_dicom_preamble(Path(path)):
        return "dicom"
    raise ImageReadError(
        f"{path}: unsupported image type; expected one of "
        f"{', '.join(RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES)}"
    )


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def max_image_pixels() -> int:
    """The pixel-count limit: MEDAUG_MAX_IMAGE_PIXELS if set, else 100 million."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "")
    try:
        return int(value) if value.strip() else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ImageReadError(f"{MAX_PIXELS_VARIABLE}={value!r}: expected a whole number of pixels") from None


def check_pixel_count(path: Path, height: int, width: int, frames: int = 1) -> None:
    """Refuse, before decoding, an image whose header claims more pixels than the limit."""
    count, limit = int(height) * int(width) * int(frames), max_image_pixels()
    if count > limit:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageReadError(f"{path}: {width} x {height}{frames_text} = {count:,} pixels, more than the limit of "
                             f"{limit:,} (a decompression bomb, or a very large image: raise {MAX_PIXELS_VARIABLE} "
                             "to read it)")


def read_array(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """Read a file's pixels in their stored dtype, shape (H, W) or (H, W, C) with RGB channel order.

    `slice_index` picks one 2D slice of a 3D NIfTI volume or one frame of a multi-frame DICOM.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    kind = image_format(path)
    try:
        if kind == "raster":
            return _read_raster(path)
        if kind == "dicom":
            return _read_dicom(path, slice_index)
        return _read_nifti(path, slice_index)
    except ImageReadError:
        raise
    except Exception as error:  # decoders raise many types; the caller needs the file name
        raise ImageReadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image

    header = _png_header(path)
    if header is not None:
        check_pixel_count(path, header["height"], header["width"])
        if header["bit_depth"] == 16 and header["colour_type"] in (2, 6):  # RGB or RGBA
            return _read_with_opencv(path)  # Pillow reduces 16-bit colour PNGs to 8 bits
    with Image.open(path) as image:
        check_pixel_count(path, image.height, image.width)  # Pillow has read the header only
        image.load()  # decode fully now, so a truncated file fails here and not later
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1", "LA", "PA"):
            image = image.convert("RGBA" if image.mode in ("LA", "PA") else ("L" if image.mode == "1" else "RGB"))
        array = np.array(image)
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # Pillow widens some 16-bit files to mode "I"
    return array


def _png_header(path: Path) -> dict | None:
    """Size, bit depth and colour type from a PNG's IHDR chunk; None for other files."""
    with open(path, "rb") as handle:
        header = handle.read(26)
    if len(header) < 26 or header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", header[16:24])
    return {"width": width, "height": height, "bit_depth": header[24], "colour_type": header[25]}


def _read_with_opencv(path: Path) -> np.ndarray:
    import cv2

    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageReadError(f"{path}: cannot decode image")
    code = cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(array, code)


def _read_dicom(path: Path, slice_index: int | None) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:  # pragma: no cover - pydicom is a core dependency
        raise ImageReadError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from error

    dataset = pydicom.dcmread(path)
    if "PixelData" not in dataset:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    check_pixel_count(path, int(dataset.Rows), int(dataset.Columns), frames)  # pixel_array decodes every frame
    pixels = dataset.pixel_array
    if frames > 1:
        pixels = pixels[_pick_slice(path, slice_index, frames)]
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return apply_color_lut(pixels, dataset)
    if not photometric.startswith("MONOCHROME"):
        return pixels  # colour (e.g. ultrasound RGB); pydicom already converted YBR to RGB
    values = apply_modality_lut(pixels, dataset)
    values = apply_voi_lut(values, dataset)
    values = values.astype(np.float32)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values  # MONOCHROME1 shows low values as white
    return values


def _read_nifti(path: Path, slice_index: int | None) -> np.ndarray:
    """One 2D slice as MONAI shows the volume after `Orientation(axcodes="RAS")`: axes reordered and flipped to
    canonical RAS by the affine, `slice_index` counting along the superior axis. Only that slice is read."""
    try:
        import nibabel
    except ImportError as error:  # pragma: no cover - nibabel is a core dependency
        raise ImageReadError(f"{path}: reading NIfTI needs nibabel (pip install nibabel)") from error

    image = nibabel.load(str(path))
    shape = image.shape
    if len(shape) < 2 or any(size > 1 for size in shape[3:]):
        raise ImageReadError(f"{path}: NIfTI data has shape {shape}; expected a 2D image or 3D volume")
    targets, flips = _ras_axes(image.affine, len(shape[:3]))
    plane = [axis for axis in range(len(shape[:3])) if shape[axis] > 1]
    if len(plane) == 3:  # a volume: the slice is the plane across the superior axis
        plane.remove(targets.index(2))
    elif len(plane) != 2:
        raise ImageReadError(f"{path}: NIfTI data has shape {shape}; expected a 2D image or 3D volume")
    plane.sort(key=lambda axis: targets[axis])  # RAS order: columns first, then rows
    check_pixel_count(path, shape[plane[1]], shape[plane[0]])
    index = _slice_index_tuple(path, shape, targets, flips, plane, slice_index)
    flat = np.asanyarray(image.dataobj[index])  # read the one slice asked for, not the whole volume
    if plane[0] > plane[1]:  # dataobj keeps the stored axis order
        flat = flat.T
    flat = flat[::flips[plane[0]], ::flips[plane[1]]]
    # (R, A) or the like: show rows as the second axis with its lowest value at the bottom row, as viewers do.
    return np.ascontiguousarray(np.flipud(flat.T))


def _ras_axes(affine: np.ndarray, spatial: int) -> tuple[list[int], list[int]]:
    """For each stored axis, the RAS axis it becomes (0 R, 1 A, 2 S) and whether it runs reversed (-1) or not (1).
    An affine that says nothing (singular) keeps the stored order."""
    from nibabel.orientations import io_orientation

    orientation = io_orientation(affine)[:spatial]
    if np.isnan(orientation).any():
        return list(range(spatial)), [1] * spatial
    return [int(target) for target in orientation[:, 0]], [int(flip) for flip in orientation[:, 1]]


def _slice_index_tuple(path: Path, shape: tuple, targets: list[int], flips: list[int], plane: list[int],
                       slice_index: int | None) -> tuple:
    index: list = [0] * len(shape)
    for axis in plane:
        index[axis] = slice(None)
    across = [axis for axis in range(len(shape[:3])) if axis not in plane]
    if across and shape[across[0]] > 1:
        axis = across[0]
        chosen = _pick_slice(path, slice_index, shape[axis])
        index[axis] = chosen if flips[axis] == 1 else shape[axis] - 1 - chosen
    return tuple(index)


def _pick_slice(path: Path, slice_index: int | None, count: int) -> int:
    if slice_index is None:
        raise ImageReadError(f"{path}: holds {count} slices; set the `slice_index` column to choose one")
    if not 0 <= slice_index < count:
        raise ImageReadError(f"{path}: slice_index {slice_index} is out of range (0..{count - 1})")
    return slice_index


def rescale_to_unit(array: np.ndarray) -> np.ndarray:
    """Map pixel values to float32 in [0, 1].

    8-bit data is divided by 255. Wider integers and floats (16-bit PNG, DICOM after its LUTs, NIfTI) are
    stretched over their own min..max: their nominal range says little about the values actually used.
    """
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    values = array.astype(np.float32)
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return (values - low) / (high - low)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Return an (H, W, channels) float array from (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) input.

    Grey becomes RGB by repetition; RGB becomes grey by ITU-R 601 luminance; alpha is dropped.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == 2:  # grey + alpha
        image = image[:, :, :1]
    have = image.shape[2]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, 3, axis=2)
    luminance = image[:, :, 0] * 0.299 + image[:, :, 1] * 0.587 + image[:, :, 2] * 0.114
    return luminance[:, :, None].astype(image.dtype)


def load_image(path: str | Path, channels: int = 3, slice_index: int | None = None) -> np.ndarray:
    """Read an image as float32 (H, W, channels) in [0, 1]."""
    # Colour images are rescaled over all channels jointly, which keeps their balance.
    return to_channels(rescale_to_unit(read_array(path, slice_index)), channels)


def load_mask(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """Read a mask as a boolean (H, W) array: any non-zero pixel is foreground."""
    array = read_array(path, slice_index)
    if array.ndim == 3:
        array = array[:, :, :3].max(axis=2)
    return array > 0


def image_size(path: str | Path, slice_index: int | None = None) -> tuple[int, int]:
    """(height, width) of an image or mask, read through the same reader as the pixels."""
    array = read_array(path, slice_index)
    return int(array.shape[0]), int(array.shape[1])
