"""medaug patches: tissue patches of a pyramidal TIFF the test writes itself (pink tissue on white glass), their
coordinates back on level 0, one split per slide, resuming, bad slides refused by name; and Path Foundation-sized
(384-d) embeddings keyed by patch file name conditioning a tiny run end to end."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import DatasetFolder
from medaug.data.patch_dataset import PROGRESS_FOLDER, PatchSettings, write_patch_dataset
from medaug.outputs import output_lock

SIZE = 128  # patch side in the tests: small and fast; the grid arithmetic is the same at 512
TISSUE = (slice(256, 768), slice(384, 1152))  # rows, columns of level 0: 4 x 6 patches of 128 px
PATH_FOUNDATION_WIDTH = 384


def slide_pixels(seed: int = 0, shape=(1024, 1536)) -> np.ndarray:
    """Off-white, slightly noisy glass with a pink, textured tissue block: the texture makes every patch's pixels
    its own."""
    rng = np.random.default_rng(seed)
    image = blank_glass(shape, rng)
    height, width = TISSUE[0].stop - TISSUE[0].start, TISSUE[1].stop - TISSUE[1].start
    pink = np.array([214, 120, 178]) + rng.integers(-25, 26, size=(height, width, 3))
    image[TISSUE] = np.clip(pink, 0, 255).astype(np.uint8)
    return image


def blank_glass(shape, rng: np.random.Generator) -> np.ndarray:
    return (240 + rng.integers(-6, 7, size=(*shape, 3))).astype(np.uint8)


def write_slide(path: Path, image: np.ndarray, levels: int = 3) -> Path:
    """A pyramidal tiled TIFF: level 0 plus `levels - 1` sub-resolution levels, each half the one before. The tiles
    (192 px) do not line up with the patches, so a patch is read from several tiles."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(image, subifds=levels - 1, tile=(192, 192), photometric="rgb", compression="zlib")
        for level in range(1, levels):
            tiff.write(image[::2 ** level, ::2 ** level], subfiletype=1, tile=(64, 64), photometric="rgb",
                       compression="zlib")
    return path


def run(*args) -> object:
    return CliRunner().invoke(app, ["patches", *map(str, args)])


def read_table(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metadata.csv", dtype={"patient_id": str})


def expected_corners(size: int, step: int) -> set[tuple[int, int]]:
    """Level-0 corners of the grid cells (`size` px at level 0 spanning `step`) wholly inside the tissue block."""
    rows, columns = TISSUE
    return {(x, y) for y in range(0, 1024, step) for x in range(0, 1536, step)
            if rows.start <= y and y + step <= rows.stop and columns.start <= x and x + step <= columns.stop}


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    return slide_pixels()


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, slide_image) -> Path:
    """The test slide cut at level 0 into 128-px patches."""
    root = tmp_path_factory.mktemp("slides")
    write_slide(root / "slides" / "case-01.tif", slide_image)
    result = run(root / "slides", "--output_dir", root / "patches", "--size", SIZE)
    assert result.exit_code == 0, result.output
    return root / "patches"


def test_tissue_patches_round_trip_to_level_0(patch_dir, slide_image):
    table = read_table(patch_dir)
    assert set(zip(table["x"], table["y"])) == expected_corners(SIZE, SIZE) and len(table) == 24
    assert set(table["patient_id"]) == {"case-01"} and set(table["slide"]) == {"case-01.tif"}
    assert set(table["level"]) == {0} and set(table["level0_width"]) == {SIZE} and min(table["tissue_fraction"]) > 0.99
    for row in table.itertuples():
        with Image.open(patch_dir / row.file_name) as patch:
            assert patch.mode == "RGB" and patch.size == (SIZE, SIZE)
            assert np.array_equal(np.asarray(patch), slide_image[row.y:row.y + SIZE, row.x:row.x + SIZE])
    DatasetFolder(patch_dir).check()  # a dataset folder medaug reads: every file there and decodable
    assert not (patch_dir / PROGRESS_FOLDER).exists() and (patch_dir / "patches.json").is_file()


def test_level_1_patches_map_to_level_0_pixels(tmp_path, slide_image):
    write_slide(tmp_path / "slides" / "s.tif", slide_image)
    result = run(tmp_path / "slides", "--output_dir", tmp_path / "out", "--size", SIZE // 2, "--level", 1)
    assert result.exit_code == 0, result.output
    table = read_table(tmp_path / "out")
    assert set(zip(table["x"], table["y"])) == expected_corners(SIZE // 2, SIZE) and set(table["level"]) == {1}
    assert set(table["level0_width"]) == {SIZE}
    for row in table.itertuples():
        with Image.open(tmp_path / "out" / row.file_name) as patch:
            assert np.array_equal(np.asarray(patch), slide_image[row.y:row.y + SIZE:2, row.x:row.x + SIZE:2])


def test_tissue_threshold_and_patch_limit(tmp_path, slide_image):
    write_slide(tmp_path / "slides" / "s.tif", slide_image)
    # 192-px patches: the block's top edge leaves one row of cells two thirds tissue, so the threshold decides
    for threshold, expected in ((0.9, 8), (0.5, 12)):
        out = tmp_path / f"t{threshold}"
        assert run(tmp_path / "slides", "--output_dir", out, "--size", 192, "--tissue_threshold", threshold,
                   "--max_patches_per_slide", 100).exit_code == 0
        assert len(read_table(out)) == expected
    result = run(tmp_path / "slides", "--output_dir", tmp_path / "few", "--size", SIZE, "--max_patches_per_slide", 5)
    assert result.exit_code == 0, result.output
    corners = set(zip(*(read_table(tmp_path / "few")[axis] for axis in ("x", "y"))))
    assert len(corners) == 5 and corners <= expected_corners(SIZE, SIZE)


def test_tissue_mask_finds_stain_not_glass(tmp_path):
    from medaug.data.slides import tissue_mask

    image = slide_pixels()[::4, ::4]
    mask = tissue_mask(image)
    inside = mask[TISSUE[0].start // 4:TISSUE[0].stop // 4, TISSUE[1].start // 4:TISSUE[1].stop // 4]
    assert inside.mean() > 0.99 and mask.sum() - inside.sum() == 0
    assert not tissue_mask(blank_glass((256, 384), np.random.default_rng(1))).any()  # Otsu alone splits the noise
    write_slide(tmp_path / "slides" / "blank.tif", blank_glass((1024, 1536), np.random.default_rng(2)))
    result = run(tmp_path / "slides", "--output_dir", tmp_path / "out", "--size", SIZE)
    assert result.exit_code == 2 and "no patch of any slide reached the tissue threshold 0.5" in result.output


def test_two_slides_never_share_a_split(tmp_path):
    write_slide(tmp_path / "slides" / "a.tif", slide_pixels(1))
    write_slide(tmp_path / "slides" / "nested" / "b.svs", slide_pixels(2))
    result = run(tmp_path / "slides", "--output_dir", tmp_path / "out", "--size", SIZE)
    assert result.exit_code == 0, result.output
    assert "wrote 48 patches of 2 slide(s)" in result.output
    table = read_table(tmp_path / "out")
    assert table.groupby("patient_id")["split"].nunique().to_dict() == {"a": 1, "b": 1}
    assert sorted(table.groupby("patient_id")["split"].first()) == ["test", "train"]
    assert set(table["slide"]) == {"a.tif", "nested/b.svs"}
    folder = DatasetFolder(tmp_path / "out")
    assert {folder.value(i, "patient_id") for i in folder.indices("train")}.isdisjoint(
        {folder.value(i, "patient_id") for i in folder.indices("test")})


def test_interrupted_run_resumes_without_cutting_finished_slides_again(tmp_path):
    for name in ("a", "b"):
        write_slide(tmp_path / "slides" / f"{name}.tif", slide_pixels())
    out = tmp_path / "out"

    def stop_after_first_slide(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_patch_dataset(tmp_path / "slides", out, PatchSettings(size=SIZE), progress=stop_after_first_slide)
    assert not (out / "metadata.csv").exists() and (out / PROGRESS_FOLDER / "a.csv").is_file()
    first = sorted((out / "patches" / "a").iterdir())
    stamps = {path: path.stat().st_mtime_ns for path in first}
    changed = run(tmp_path / "slides", "--output_dir", out, "--size", SIZE * 2)
    assert changed.exit_code == 2 and "unfinished run with other settings (size)" in changed.output
    assert run(tmp_path / "slides", "--output_dir", out, "--size", SIZE).exit_code == 0
    assert {path: path.stat().st_mtime_ns for path in first} == stamps
    assert len(read_table(out)) == 48 and not (out / PROGRESS_FOLDER).exists()
    again = run(tmp_path / "slides", "--output_dir", out, "--size", SIZE)
    assert again.exit_code == 2 and "already holds a dataset" in again.output and "--overwrite" in again.output


def test_a_folder_held_by_another_run_is_refused(tmp_path, slide_image):
    write_slide(tmp_path / "slides" / "s.tif", slide_image)
    with output_lock(tmp_path / "out"):
        result = run(tmp_path / "slides", "--output_dir", tmp_path / "out")
    assert result.exit_code == 2 and "in use by another run" in result.output
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "metadata.csv").exists()


def tifffile_open(path: Path, mode: str = "rb"):
    import tifffile

    return tifffile.TiffFile(path, mode=mode)


def damage_tissue_tile(path: Path) -> None:
    """Overwrite one level-0 tile inside the tissue block with noise; headers and other levels stay whole."""
    with tifffile_open(path) as tiff:
        page = tiff.series[0].levels[0].keyframe
        index = 2 * page.chunked[1] + 3  # tile row 2, column 3: pixels 384-575 down, 576-767 across
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(os.urandom(count))


def bad_slide(kind: str, slides: Path, outside: Path) -> tuple[Path, list[str], str]:
    """Make a bad slide beside a good one: (the bad file, extra flags, what the error says about it)."""
    write_slide(slides / "good.tif", slide_pixels())
    bad = slides / "bad.tif"
    if kind == "corrupt":
        bad.write_bytes(b"II*\x00" + os.urandom(200))
        return bad, [], "not a readable TIFF slide"
    if kind == "not_tiff":
        bad = slides / "bad.svs"
        bad.write_text("this is a report, not a slide\n")
        return bad, [], "not a readable TIFF slide"
    if kind == "level":
        write_slide(bad, slide_pixels(), levels=1)
        return bad, ["--level", "2"], "has 1 pyramid level(s) (0-0); --level 2 does not exist"
    if kind == "damaged_tiles":
        damage_tissue_tile(write_slide(bad, slide_pixels()))
        return bad, [], "cannot be decoded"
    if kind == "jpeg_without_imagecodecs":
        if importlib.util.find_spec("imagecodecs") is not None:
            pytest.skip("imagecodecs is installed, so JPEG tiles decode")
        with tifffile_open(write_slide(bad, slide_pixels()), mode="r+") as tiff:
            tiff.series[0].levels[0].keyframe.tags["Compression"].overwrite(7)  # level 0 claims JPEG (as SVS)
        return bad, [], "requires the 'imagecodecs' package); install imagecodecs"
    if kind == "link_outside":
        target = write_slide(outside / "elsewhere.tif", slide_pixels())
        bad.symlink_to(target)
        return bad, [], "outside"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["corrupt", "not_tiff", "level", "damaged_tiles", "jpeg_without_imagecodecs",
                                  "link_outside"])
def test_bad_slides_are_refused_by_name(tmp_path, kind):
    bad, flags, message = bad_slide(kind, tmp_path / "slides", tmp_path / "outside")
    result = CliRunner().invoke(app, ["patches", str(tmp_path / "slides"), "--output_dir", str(tmp_path / "out"),
                                      "--size", str(SIZE), *flags])
    assert result.exit_code == 2, result.output
    assert f"error: {bad}: " in " ".join(result.output.split()) and message in result.output
    assert not (tmp_path / "out" / "metadata.csv").exists()


def test_bad_settings_are_refused_by_flag(tmp_path, slide_image):
    write_slide(tmp_path / "slides" / "s.tif", slide_image)
    for flags, message in ((["--tissue_threshold", "1.5"], "--tissue_threshold: 1.5"),
                           (["--size", "4096"], "smaller than one 4096-px patch")):
        result = run(tmp_path / "slides", "--output_dir", tmp_path / "out", *flags)
        assert result.exit_code == 2 and message in result.output, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(empty, "--output_dir", tmp_path / "out")
    assert result.exit_code == 2 and "no slide files" in result.output


# Path Foundation: 224 x 224 RGB patches in, one 384-d vector out, keyed here by the patch's file_name. The vectors
# below are random TEST VECTORS standing in for the model's output, not embeddings from any model.

def write_test_vectors(patch_dir: Path, path: Path, width: int = PATH_FOUNDATION_WIDTH) -> Path:
    names = read_table(patch_dir)["file_name"].tolist()
    vectors = np.random.default_rng(0).normal(size=(len(names), width)).astype(np.float32)
    np.savez(path, file_name=np.array(names, dtype=str), embeddings=vectors)
    return path


def test_path_foundation_sized_embeddings_condition_a_run_end_to_end(patch_dir, tiny_model_dir, tmp_path,
                                                                       one_torch_thread):
    from medaug.embeddings import load_embeddings, save_embeddings
    from medaug.scripts import finetune

    imported = tmp_path / "path_foundation.safetensors"
    result = CliRunner().invoke(app, ["embed", str(patch_dir), "--import_file",
                                      str(write_test_vectors(patch_dir, tmp_path / "test_vectors.npz")),
                                      "--shape", str(PATH_FOUNDATION_WIDTH), "--output", str(imported)])
    assert result.exit_code == 0, result.output
    embeddings = load_embeddings(imported)
    assert sorted(embeddings) == sorted(read_table(patch_dir)["file_name"])
    assert {value.shape for value in embeddings.values()} == {(PATH_FOUNDATION_WIDTH,)}
    run_dir = tmp_path / "run"
    finetune.main(finetune.parse_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(patch_dir),
        "--output_dir", str(run_dir), "--latent_cache_dir", str(tmp_path / "cache"), "--resolution", "64",
        "--max_train_steps", "2", "--train_batch_size", "2", "--max_train_samples", "4", "--report_to", "none",
        "--seed", "0", "--conditioning", "embedding", "--embeddings_file", str(imported)]))
    synthetic = tmp_path / "synthetic"
    result = CliRunner().invoke(app, ["generate", "--model_dir", str(run_dir), "--from_images", str(patch_dir),
                                      "--embeddings_file", str(imported), "--output_dir", str(synthetic),
                                      "--max_sources", "2", "--num_inference_steps", "2"])
    assert result.exit_code == 0, result.output
    images = sorted((synthetic / "images").iterdir())
    assert len(images) == 2
    with Image.open(images[0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"  # learned from RGB patches
    assert len(DatasetFolder(synthetic)) == 2
    narrow = tmp_path / "narrow.safetensors"
    save_embeddings(narrow, {name: vector[:-1] for name, vector in embeddings.items()})
    result = CliRunner().invoke(app, ["generate", "--model_dir", str(run_dir), "--from_images", str(patch_dir),
                                      "--embeddings_file", str(narrow), "--output_dir", str(tmp_path / "refused"),
                                      "--max_sources", "2", "--num_inference_steps", "2"])
    assert result.exit_code == 2 and f"{narrow}: " in " ".join(result.output.split()), result.output
    assert "(383,), expected (384,)" in result.output


def test_embeddings_of_the_wrong_width_are_refused_on_import(patch_dir, tmp_path):
    narrow = write_test_vectors(patch_dir, tmp_path / "narrow.npz", width=PATH_FOUNDATION_WIDTH - 1)
    result = CliRunner().invoke(app, ["embed", str(patch_dir), "--import_file", str(narrow), "--shape",
                                      str(PATH_FOUNDATION_WIDTH), "--output", str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2
    assert f"{narrow}: " in " ".join(result.output.split())
    assert "383 values, which cannot be shaped (384,)" in result.output
    assert not (tmp_path / "e.safetensors").exists()
