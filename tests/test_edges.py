"""medaug.edges: each method on a real BUSI image, the mask boundary's geometry, Canny's thresholds, the
MONAI-style transforms, and `medaug edges` writing a dataset folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug import edges
from medaug.cli import app
from medaug.data import DatasetFolder, load_image, load_mask, read_array
from tests.conftest import shared_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def busi_pair():
    """A benign BUSI image with a mask covering at least 5% of it, as (image (H, W), mask (H, W))."""
    folder = DatasetFolder(shared_dataset("busi"))
    for index in range(len(folder)):
        if folder.value(index, "label") == "benign" and folder.value(index, "mask_file_name"):
            mask = load_mask(folder.path(index, "mask_file_name"))
            if mask.mean() >= 0.05:
                return load_image(folder.path(index, "file_name"), 1)[:, :, 0], mask
    pytest.fail("no benign BUSI row with a mask covering 5% of its image")


def _square_mask(size=40, side=10, top=5, left=7):
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def _disc_image(size=64, inside=0.8, outside=0.2):
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2, inside, outside).astype(np.float32)


@pytest.mark.parametrize("method", sorted(edges.EDGE_METHODS))
def test_each_method_on_a_real_busi_image(busi_pair, method):
    image, mask = busi_pair
    result = edges.edge_map(method, image, mask)
    assert result.shape == image.shape and result.dtype == np.float32
    assert result.min() >= 0.0 and result.max() <= 1.0
    if method in ("sobel", "scharr"):
        assert result.mean() > 0.01 and result.max() == pytest.approx(1.0)
    elif method == "mask_boundary":  # a one-pixel outline of a lesion: a thin but real share of the image
        assert 0.001 < (result > 0.5).mean() < 0.05 and result.sum() < 0.5 * mask.sum()
    else:
        assert 0.005 < (result > 0.5).mean() < 0.5, method


def test_each_method_accepts_rgb_like_grey(busi_pair):
    image, _ = busi_pair
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    for method in ("canny", "sobel", "scharr"):
        np.testing.assert_allclose(edges.edge_map(method, rgb), edges.edge_map(method, image), atol=1e-6)


def test_mask_boundary_lies_on_the_mask_border(busi_pair):
    _, mask = busi_pair
    boundary = edges.mask_boundary(mask) > 0
    assert boundary.any()
    assert not (boundary & ~mask).any()  # every boundary pixel is inside the mask
    padded = np.pad(mask, 1, mode="edge")  # the image border does not count as outside
    height, width = mask.shape
    neighbours_outside = np.zeros_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            neighbours_outside |= ~padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
    np.testing.assert_array_equal(boundary, mask & neighbours_outside)


@pytest.mark.parametrize("side, thickness", [(10, 1), (10, 2), (7, 3)])
def test_square_boundary_has_the_known_pixel_count(side, thickness):
    boundary = edges.mask_boundary(_square_mask(side=side), thickness=thickness)
    inner = max(side - 2 * thickness, 0)
    assert int(boundary.sum()) == side * side - inner * inner
    assert boundary[5, 7] == 1 and boundary[5 + side // 2, 7 + side // 2] == (1 if inner == 0 else 0)


def test_canny_thresholds_follow_the_median_and_explicit_ones_are_honoured(busi_pair):
    dark, bright = _disc_image(inside=0.3, outside=0.1), _disc_image(inside=0.9, outside=0.7)
    low_dark, high_dark = edges.median_thresholds(dark)
    low_bright, high_bright = edges.median_thresholds(bright)
    assert low_dark < low_bright and high_dark < high_bright
    assert high_bright == pytest.approx(1.33 * round(0.7 * 255))
    image, _ = busi_pair
    low, high = edges.median_thresholds(image)
    np.testing.assert_array_equal(edges.canny_edges(image), edges.canny_edges(image, low=low, high=high))
    loose = edges.canny_edges(image, low=20, high=40).sum()
    strict = edges.canny_edges(image, low=120, high=240).sum()
    assert strict < 0.5 * loose


def test_edge_map_names_unknown_methods_options_and_missing_masks(busi_pair):
    image, _ = busi_pair
    with pytest.raises(ValueError, match="'laplace'"):
        edges.edge_map("laplace", image)
    for method in ("mask_boundary", "fused"):
        with pytest.raises(ValueError, match=f"'{method}' needs a mask"):
            edges.edge_map(method, image)
    with pytest.raises(ValueError, match="'sobel' takes no option low"):
        edges.edge_map("sobel", image, low=10)


def test_fused_is_the_maximum_of_image_edges_and_mask_boundary(busi_pair):
    image, mask = busi_pair
    fused = edges.fused_edges(image, mask, method="sobel", thickness=2)
    expected = np.maximum(edges.sobel_edges(image), edges.mask_boundary(mask, 2))
    np.testing.assert_allclose(fused, expected, atol=1e-6)  # OpenCV may round differently between calls
    assert not np.array_equal(fused, edges.sobel_edges(image))  # the boundary added something


def test_edge_mapd_touches_only_its_keys(busi_pair):
    image, mask = busi_pair
    label = {"name": "benign"}
    data = {"image": image, "mask": mask, "label": label}
    result = edges.EdgeMapd(keys="image", method="fused", output_key="edges", thickness=2)(data)
    assert set(result) == {"image", "mask", "label", "edges"} and "edges" not in data
    assert result["image"] is image and result["mask"] is mask and result["label"] is label
    np.testing.assert_array_equal(result["edges"], edges.fused_edges(image, mask, thickness=2))
    np.testing.assert_array_equal(edges.EdgeMap("canny")(image), edges.canny_edges(image))
    with pytest.raises(ValueError, match="needs a mask under key 'mask'"):
        edges.EdgeMapd(keys="image", method="fused")({"image": image})


def _invoke(*args):
    return runner.invoke(app, ["edges", *[str(arg) for arg in args]])


def test_medaug_edges_writes_a_dataset_folder(phantom_dir, tmp_path):
    out = tmp_path / "edges-out"
    result = _invoke(phantom_dir, "--method", "fused", "--output_dir", out, "--thickness", "2")
    assert result.exit_code == 0, result.output
    DatasetFolder(out).check()
    table = pd.read_csv(out / "metadata.csv", dtype=str, keep_default_na=False)
    assert len(table) == 20 and (table["conditioning_image_file_name"] != "").all()
    assert table["conditioning_image_file_name"].str.startswith("edges/").all()
    for row in table.itertuples():
        edge = read_array(out / row.conditioning_image_file_name)
        assert edge.shape == read_array(out / row.file_name).shape[:2] + (3,) and edge.dtype == np.uint8
        assert (edge[:, :, 0] == edge[:, :, 1]).all() and (edge[:, :, 0] == edge[:, :, 2]).all()
        boundary = edges.mask_boundary(load_mask(out / row.mask_file_name), 2) > 0
        assert (edge[:, :, 0][boundary] == 255).all()  # the fused map holds the mask's boundary
    again = _invoke(phantom_dir, "--method", "fused", "--output_dir", out)
    assert again.exit_code == 2 and "--output_dir" in again.output
    assert _invoke(phantom_dir, "--method", "canny", "--output_dir", out, "--overwrite").exit_code == 0


def test_medaug_edges_writes_one_split(phantom_dir, tmp_path):
    result = _invoke(phantom_dir, "--method", "sobel", "--split", "test", "--output_dir", tmp_path / "test")
    assert result.exit_code == 0, result.output
    assert (DatasetFolder(tmp_path / "test").table["split"] == "test").sum() == 4 == len(
        DatasetFolder(tmp_path / "test"))


def test_medaug_edges_names_bad_flags_and_missing_masks(phantom_dir, write_dataset, tmp_path):
    unknown = _invoke(phantom_dir, "--method", "laplace", "--output_dir", tmp_path / "a")
    assert unknown.exit_code == 2 and "laplace" in unknown.output
    misplaced = _invoke(phantom_dir, "--method", "sobel", "--low", "10", "--output_dir", tmp_path / "b")
    assert misplaced.exit_code == 2 and "--low" in misplaced.output
    (tmp_path / "images").mkdir()
    Image.fromarray(_disc_image().__mul__(255).astype(np.uint8)).save(tmp_path / "images" / "a.png")
    source = write_dataset([{"file_name": "images/a.png", "label": "x"}])
    no_masks = _invoke(source, "--method", "fused", "--output_dir", tmp_path / "c")
    assert no_masks.exit_code == 2 and "mask_file_name" in no_masks.output
    assert not (tmp_path / "c").exists()  # refused before writing anything
