"""A dataset folder of tissue patches cut from whole-slide images (what `medaug patches` writes).

Each slide is one patient: `patient_id` is the slide id, and every patch of a slide lands in the slide's split, so
no slide is shared between train, val and test. Patches are PNGs under `patches/<slide id>/`, named by their level
and level-0 corner; `metadata.csv` adds the slide's file (`slide`, relative to the slide folder: not a
`*_file_name` column, because the slide is not inside the dataset folder), the level, the corner at level 0, the
footprint at level 0 and the tissue fraction. `patches.json` records the settings and the count per slide.

A killed run resumes: each finished slide leaves its rows in `.patches-progress/`, beside the settings they were
cut with, and a rerun with the same settings and slides cuts only the slides not yet finished. `metadata.csv`
comes last, so a folder that has one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medaug.data.slides import PatchBox, SlideError, find_slides, level_downsample, open_slide, slide_ids, \
    tissue_patches
from medaug.files import partial_path, write_json_atomic, write_text_atomic

PROGRESS_FOLDER = ".patches-progress"
RECORD_NAME = "patches.json"
COLUMNS = ("file_name", "split", "patient_id", "slide", "level", "x", "y", "level0_width", "level0_height",
           "tissue_fraction")


@dataclass(frozen=True)
class PatchSettings:
    """How patches are cut: `size` px at pyramid `level`, kept at `tissue_threshold` tissue or more."""

    size: int = 512
    level: int = 0
    tissue_threshold: float = 0.5
    max_patches_per_slide: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    reader: str = "tifffile"

    def check(self) -> None:
        if self.size < 8:
            raise ValueError(f"--size: {self.size} px is too small for a patch")
        if self.level < 0:
            raise ValueError(f"--level: {self.level} is negative; level 0 is full resolution")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ValueError(f"--tissue_threshold: {self.tissue_threshold} is not a fraction in [0, 1]")
        if self.max_patches_per_slide is not None and self.max_patches_per_slide < 1:
            raise ValueError(f"--max_patches_per_slide: {self.max_patches_per_slide} must be at least 1")
        if min(self.val_fraction, self.test_fraction) < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("--val_fraction and --test_fraction must be at least 0 and add up to less than 1")


def slide_splits(ids: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """{slide id: split}: slides in a seeded order, test first, then val, the rest train. With two or more slides
    a positive fraction gets at least one slide, but train always keeps one."""
    count = len(ids)
    tests = max(1, round(test_fraction * count)) if test_fraction > 0 and count >= 2 else 0
    vals = max(1, round(val_fraction * count)) if val_fraction > 0 and count - tests >= 2 else 0
    tests = min(tests, count - 1) if count else 0
    vals = max(0, min(vals, count - 1 - tests))
    order = [sorted(ids)[i] for i in np.random.default_rng(seed).permutation(count)]
    return {slide_id: "test" if rank < tests else "val" if rank < tests + vals else "train"
            for rank, slide_id in enumerate(order)}


def write_patch_dataset(slide_dir: str | Path, output_dir: str | Path, settings: PatchSettings,
                        overwrite: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Cut every slide under `slide_dir` into tissue patches in the dataset folder `output_dir`; return the number
    of patches per slide id. Every slide is opened and checked before any patch is written."""
    settings.check()
    slide_dir, output_dir = Path(slide_dir), Path(output_dir)
    slides = find_slides(slide_dir)
    ids = slide_ids(slides, slide_dir)
    record = {"settings": asdict(settings),
              "slides": {ids[path]: path.relative_to(slide_dir).as_posix() for path in slides}}
    progress_dir = _prepare_output(output_dir, record, overwrite)
    plans = {path: plan_slide(path, ids[path], settings) for path in slides}
    splits = slide_splits(list(ids.values()), settings.seed, settings.val_fraction, settings.test_fraction)
    for path, boxes in plans.items():
        done = progress_dir / f"{ids[path]}.csv"
        if not done.is_file():
            rows = write_slide_patches(path, ids[path], boxes, output_dir, settings)
            table = pd.DataFrame(rows, columns=COLUMNS)
            table["split"], table["slide"] = splits[ids[path]], record["slides"][ids[path]]
            write_text_atomic(done, table.to_csv(index=False))
        if progress is not None:
            progress(1)
    return _finish(output_dir, progress_dir, [ids[path] for path in slides], record)


def _prepare_output(output_dir: Path, record: dict, overwrite: bool) -> Path:
    """The progress folder of this run: fresh, or an interrupted run's with the same settings and slides."""
    progress_dir = output_dir / PROGRESS_FOLDER
    if overwrite:
        for name in ("metadata.csv", RECORD_NAME):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(progress_dir, ignore_errors=True)
    if (output_dir / "metadata.csv").exists():
        raise FileExistsError(f"{output_dir} already holds a dataset (metadata.csv); choose another folder or "
                              "pass overwrite")
    settings_file = progress_dir / "settings.json"
    if settings_file.is_file():
        earlier = json.loads(settings_file.read_text(encoding="utf-8"))
        if earlier != record:
            raise FileExistsError(f"{output_dir} holds an unfinished run with other {_differences(earlier, record)}; "
                                  "rerun it with its own settings, choose another folder or pass overwrite")
    write_json_atomic(settings_file, record)
    return progress_dir


def _differences(earlier: dict, now: dict) -> str:
    changed = [name for name, value in now["settings"].items() if earlier.get("settings", {}).get(name) != value]
    if earlier.get("slides") != now["slides"]:
        changed.append("slides")
    return "settings (" + ", ".join(changed or ["format"]) + ")"


def plan_slide(path: Path, slide_id: str, settings: PatchSettings) -> list[PatchBox]:
    """The tissue patches to cut from one slide, at most `max_patches_per_slide` of them (a seeded draw)."""
    slide = open_slide(path, settings.reader)
    try:
        boxes = tissue_patches(slide, settings.level, settings.size, settings.tissue_threshold)
    finally:
        slide.close()
    limit = settings.max_patches_per_slide
    if limit is not None and len(boxes) > limit:
        rng = np.random.default_rng([settings.seed, zlib.crc32(slide_id.encode())])
        boxes = [boxes[i] for i in sorted(rng.choice(len(boxes), size=limit, replace=False))]
    return boxes


def patch_file_name(slide_id: str, level: int, box: PatchBox) -> str:
    return f"patches/{slide_id}/{slide_id}_L{level}_x{box.x}_y{box.y}.png"


def write_slide_patches(path: Path, slide_id: str, boxes: list[PatchBox], output_dir: Path,
                        settings: PatchSettings) -> list[dict]:
    """Write one slide's patches as PNGs (each under a temporary name, then renamed); return their rows."""
    slide = open_slide(path, settings.reader)
    try:
        scale_x, scale_y = level_downsample(slide.level_sizes, settings.level)
        rows = []
        for box in boxes:
            name = patch_file_name(slide_id, settings.level, box)
            pixels = slide.read(settings.level, box.level_x, box.level_y, settings.size, settings.size)
            _write_png(pixels, output_dir / name)
            rows.append({"file_name": name, "patient_id": slide_id, "level": settings.level, "x": box.x, "y": box.y,
                         "level0_width": round(settings.size * scale_x),
                         "level0_height": round(settings.size * scale_y),
                         "tissue_fraction": round(box.tissue_fraction, 4)})
        return rows
    finally:
        slide.close()


def _write_png(pixels: np.ndarray, target: Path) -> None:
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    Image.fromarray(pixels, mode="RGB").save(partial, format="PNG")
    os.replace(partial, target)


def _finish(output_dir: Path, progress_dir: Path, ids: list[str], record: dict) -> dict[str, int]:
    """Join the slides' rows into metadata.csv (last, so its presence means the folder is complete)."""
    tables = [pd.read_csv(progress_dir / f"{slide_id}.csv", dtype=str, keep_default_na=False) for slide_id in ids]
    counts = {slide_id: len(table) for slide_id, table in zip(ids, tables)}
    if not sum(counts.values()):
        raise SlideError(f"{output_dir}: no patch of any slide reached the tissue threshold "
                         f"{record['settings']['tissue_threshold']}; lower --tissue_threshold or --size")
    write_json_atomic(output_dir / RECORD_NAME, {**record, "patches": counts})
    write_text_atomic(output_dir / "metadata.csv", pd.concat(tables).to_csv(index=False))
    shutil.rmtree(progress_dir)
    return counts
