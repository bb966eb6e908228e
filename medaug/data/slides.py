"""Whole-slide images: pyramid levels, regions read tile by tile, a tissue mask, and the patch grid over tissue.

Slides are pyramidal TIFF files (generic tiled TIFF with sub-resolution levels, Aperio SVS) read with tifffile,
which decodes only the tiles a region touches, so a slide of 100,000 pixels a side never sits in memory. A reader
is anything with `path`, `level_sizes`, `read` and `close` (see `TiffSlide`): another library (openslide, for the
formats it adds) fits behind `open_slide` as one more class, once its package is declared as an extra.

Tissue is found on the coarsest level: Otsu's threshold on HSV saturation (H&E stains are saturated, glass and
background are white or grey), never below `MIN_SATURATION` so that a blank slide has no tissue. A patch of the
grid at the chosen level is kept when the tissue fraction of its footprint is at least the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff")
READERS = ("tifffile",)
MIN_SATURATION = 20  # of 255: JPEG noise on white glass stays below it, stained tissue lies well above it
JPEG_COMPRESSIONS = (6, 7, 33007, 34892)  # TIFF compression codes whose tiles share JPEG tables
EMPTY_TILE_VALUE = 255  # a tile the file leaves out is background, which is white on a bright-field slide


class SlideError(ValueError):
    """A slide cannot be used; the message starts with its file."""


@dataclass(frozen=True)
class PatchBox:
    """A patch: its top-left corner at level 0 and at its own level, and the tissue fraction of its footprint."""

    x: int
    y: int
    level_x: int
    level_y: int
    tissue_fraction: float


def find_slides(slide_dir: str | Path) -> list[Path]:
    """Slide files (.svs, .tif, .tiff) anywhere under `slide_dir`, sorted; links that lead outside it are refused."""
    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise SlideError(f"{slide_dir}: not a folder of slides")
    root = slide_dir.resolve()
    slides = sorted(path for path in slide_dir.rglob("*") if path.suffix.lower() in SLIDE_SUFFIXES)
    for path in slides:
        if not path.resolve().is_relative_to(root):
            raise SlideError(f"{path}: links to {path.resolve()}, outside {slide_dir}; copy the slide into the folder")
    slides = [path for path in slides if path.is_file()]
    if not slides:
        raise SlideError(f"{slide_dir}: no slide files ({', '.join(SLIDE_SUFFIXES)}) found")
    return slides


def slide_ids(slides: list[Path], slide_dir: str | Path) -> dict[Path, str]:
    """{slide: id}: the file name without its suffix; two slides with one id are refused by name."""
    ids: dict[str, Path] = {}
    for path in slides:
        if path.stem in ids:
            raise SlideError(f"{path}: has the same slide id '{path.stem}' as {ids[path.stem]}; rename one of them")
        ids[path.stem] = path
    return {path: slide_id for slide_id, path in ids.items()}


def open_slide(path: str | Path, reader: str = "tifffile"):
    """A slide reader: `level_sizes` [(width, height), ...] from level 0 down, `read(level, x, y, w, h)` in level
    pixels as (h, w, 3) uint8, `close()`."""
    if reader == "tifffile":
        return TiffSlide(path)
    raise SlideError(f"unknown slide reader '{reader}'; expected one of {', '.join(READERS)}")


class TiffSlide:
    """A pyramidal TIFF read with tifffile, one tile (or strip) at a time."""

    def __init__(self, path: str | Path):
        import tifffile

        self.path = Path(path)
        try:
            self._tiff = tifffile.TiffFile(self.path)
            levels = self._tiff.series[0].levels
        except (tifffile.TiffFileError, ValueError, IndexError, OSError) as error:
            raise SlideError(f"{self.path}: not a readable TIFF slide ({error})") from None
        self._pages = [level.keyframe for level in levels]
        for page in self._pages:
            _check_page_layout(self.path, page)
        self.level_sizes = [(page.imagewidth, page.imagelength) for page in self._pages]

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        seg_height, seg_width = page.chunks[0], page.chunks[1]
        columns = page.chunked[1]
        out = np.full((height, width, page.samplesperpixel), EMPTY_TILE_VALUE, dtype=page.dtype)
        for row in range(y // seg_height, (y + height - 1) // seg_height + 1):
            for column in range(x // seg_width, (x + width - 1) // seg_width + 1):
                segment = self._segment(page, row * columns + column)
                if segment is not None:
                    _paste(out, segment, row * seg_height - y, column * seg_width - x)
        return to_rgb8(out, self.path)

    def _segment(self, page, index: int) -> np.ndarray | None:
        """The decoded tile or strip `index` as (h, w, samples), or None where the file leaves it out."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        handle = self._tiff.filehandle
        handle.seek(offset)
        data = handle.read(count)
        options = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} \
            if page.compression in JPEG_COMPRESSIONS else {}
        try:
            decoded, _, _ = page.decode(data, index, **options)
        except Exception as error:  # noqa: BLE001  each codec reports damage its own way
            raise SlideError(f"{self.path}: tile {index} cannot be decoded ({type(error).__name__}: {error})"
                             f"{_codec_advice(error)}") from None
        return decoded.reshape(decoded.shape[-3:])

    def close(self) -> None:
        self._tiff.close()


def _check_page_layout(path: Path, page) -> None:
    if page.imagedepth > 1:
        raise SlideError(f"{path}: volumetric TIFF (depth {page.imagedepth}); expected a 2D slide")
    if page.samplesperpixel > 1 and page.planarconfig != 1:
        raise SlideError(f"{path}: colour planes are stored separately (planar configuration 2), which medaug "
                         "does not read; convert the slide to contiguous RGB")


def _codec_advice(error: Exception) -> str:
    return "; install imagecodecs (`pip install imagecodecs`) for this compression" if "imagecodecs" in str(error) \
        else ""


def _paste(out: np.ndarray, segment: np.ndarray, top: int, left: int) -> None:
    """Copy the part of `segment` (placed at `top`, `left` relative to `out`) that falls inside `out`."""
    height, width = out.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + segment.shape[0], height), min(left + segment.shape[1], width)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = segment[y0 - top:y1 - top, x0 - left:x1 - left]


def to_rgb8(region: np.ndarray, path: Path) -> np.ndarray:
    """(h, w, 3) uint8 from grey, RGB or RGBA pixels; wider integers by their nominal range, floats from [0, 1]."""
    from medaug.data.loading import to_channels

    if region.dtype != np.uint8:
        if np.issubdtype(region.dtype, np.integer):
            region = region.astype(np.float64) * (255.0 / np.iinfo(region.dtype).max)
        elif np.issubdtype(region.dtype, np.floating):
            region = np.clip(region, 0.0, 1.0) * 255.0
        else:
            raise SlideError(f"{path}: pixels of type {region.dtype} are not an image")
        region = np.round(region).astype(np.uint8)
    if region.ndim == 3 and region.shape[2] not in (1, 2, 3, 4):
        raise SlideError(f"{path}: {region.shape[2]} samples per pixel; expected grey, RGB or RGBA")
    return np.ascontiguousarray(to_channels(region, 3))


def level_downsample(level_sizes: list[tuple[int, int]], level: int) -> tuple[float, float]:
    """How many level-0 pixels one pixel of `level` spans, across and down."""
    (width0, height0), (width, height) = level_sizes[0], level_sizes[level]
    return width0 / width, height0 / height


def check_level(path: Path, level_sizes: list[tuple[int, int]], level: int, size: int) -> None:
    """Refuse a slide without `level`, or whose `level` is smaller than one patch."""
    if level >= len(level_sizes):
        raise SlideError(f"{path}: has {len(level_sizes)} pyramid level(s) (0-{len(level_sizes) - 1}); "
                         f"--level {level} does not exist")
    width, height = level_sizes[level]
    if width < size or height < size:
        raise SlideError(f"{path}: level {level} is {width}x{height} px, smaller than one {size}-px patch")


def read_whole_level(slide, level: int) -> np.ndarray:
    width, height = slide.level_sizes[level]
    return slide.read(level, 0, 0, width, height)


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image: Otsu on HSV saturation, with `MIN_SATURATION` as the floor."""
    import cv2

    saturation = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)[:, :, 1]
    saturation = cv2.medianBlur(saturation, 3)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return saturation > max(otsu, MIN_SATURATION)


def patch_grid(level_sizes: list[tuple[int, int]], level: int, size: int, mask: np.ndarray,
               threshold: float) -> list[PatchBox]:
    """Non-overlapping `size`-px patches of `level` whose footprint on `mask` is at least `threshold` tissue."""
    width, height = level_sizes[level]
    scale_x, scale_y = level_downsample(level_sizes, level)
    mask_x, mask_y = mask.shape[1] / width, mask.shape[0] / height
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    boxes = []
    for top in range(0, height - size + 1, size):
        for left in range(0, width - size + 1, size):
            fraction = _box_fraction(integral, left * mask_x, top * mask_y, size * mask_x, size * mask_y)
            if fraction >= threshold:
                boxes.append(PatchBox(round(left * scale_x), round(top * scale_y), left, top, fraction))
    return boxes


def _box_fraction(integral: np.ndarray, x: float, y: float, width: float, height: float) -> float:
    """Mean of the mask over the pixels a box covers (at least one pixel, however small the box on the mask)."""
    rows, columns = integral.shape[0] - 1, integral.shape[1] - 1
    x0, y0 = min(int(np.floor(x)), columns - 1), min(int(np.floor(y)), rows - 1)
    x1, y1 = max(min(int(np.ceil(x + width)), columns), x0 + 1), max(min(int(np.ceil(y + height)), rows), y0 + 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return float(total / ((x1 - x0) * (y1 - y0)))


def tissue_patches(slide, level: int, size: int, threshold: float) -> list[PatchBox]:
    """The patch grid of `level` over the tissue found on the slide's coarsest level."""
    check_level(slide.path, slide.level_sizes, level, size)
    mask = tissue_mask(read_whole_level(slide, len(slide.level_sizes) - 1))
    return patch_grid(slide.level_sizes, level, size, mask, threshold)
