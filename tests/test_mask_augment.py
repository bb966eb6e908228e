"""New mask shapes: every new mask is valid (a lesion, inside the image, same size, area in range), they differ from
their sources, draws repeat with the seed, and the written folder is a dataset `medaug generate` can read."""

from __future__ import annotations

import numpy as np
import pytest

from medaug.data import DatasetFolder, load_mask
from medaug.data.mask_augment import MaskAugmentation, acceptable, new_mask, write_mask_dataset
from medaug.data.phantom import lesion_mask


@pytest.fixture(scope="module")
def sources():
    rng = np.random.default_rng(0)
    return [lesion_mask(kind, 64, rng) for kind in ("round", "irregular") * 6]


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_every_new_mask_is_valid_and_new(sources):
    rng, options = np.random.default_rng(1), MaskAugmentation()
    made = [new_mask(source, sources, rng, options) for source in sources for _ in range(5)]
    assert sum(mask is None for mask in made) <= 3  # almost every source gives new shapes
    for mask, source in zip(made, [s for s in sources for _ in range(5)]):
        if mask is None:
            continue
        assert mask.shape == source.shape and mask.dtype == bool and mask.any()
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert 0.4 <= mask.sum() / source.sum() <= 5.0
    assert np.mean([iou(m, s) for m, s in zip(made, [s for s in sources for _ in range(5)]) if m is not None]) < 0.8


def test_draws_repeat_with_the_seed_and_refuse_what_they_cannot_make(sources):
    first = new_mask(sources[0], sources, np.random.default_rng(7))
    again = new_mask(sources[0], sources, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    assert new_mask(np.zeros((64, 64), bool), sources, np.random.default_rng(0)) is None  # no lesion to deform
    touching = np.zeros((64, 64), bool)
    touching[:, :40] = True  # a lesion over the whole left side cannot stay off the border
    assert not acceptable(touching, touching, MaskAugmentation())
    assert new_mask(touching, [], np.random.default_rng(0), MaskAugmentation(tries=3)) is None


def test_the_written_folder_is_a_dataset_of_new_masks_beside_their_images(phantom_dir, tmp_path):
    counts = write_mask_dataset(phantom_dir, tmp_path / "shapes", per_mask=2, resolution=64, seed=0)
    folder = DatasetFolder(tmp_path / "shapes")
    folder.check()  # every image and mask readable, the same size, nothing listed twice
    assert counts["masks"] == len(folder) > 0 and counts["sources"] == len(DatasetFolder(phantom_dir).indices("train"))
    assert counts["masks"] + counts["skipped_draws"] == 2 * counts["sources"]
    for index in range(len(folder)):
        mask = load_mask(folder.path(index, "mask_file_name"))
        assert mask.shape == (64, 64) and mask.any()
        assert folder.value(index, "text") and folder.split(index) == "train"
