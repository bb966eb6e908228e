"""One segmentation engine: the same arm, data, recipe and seed give the same per-image Dice through `medaug bench`
(and the demo, which calls it) and through `medaug study`'s arms."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from medaug.lowdata.study import Arm, LowDataSettings, run_arm
from medaug.segmentation.arms import ARMS, arm_items
from medaug.segmentation.inputs import load_study_data
from medaug.segmentation.study import run_study


def test_the_same_arm_scores_the_same_through_bench_and_study(phantom_dir, tmp_path):
    run_study("seg", phantom_dir, tmp_path / "bench", arms=["real+classical"], seeds=1, steps=6, resolution=32,
              batch_size=4, device="cpu")
    bench = json.loads((tmp_path / "bench/runs/real-classical_f1_r0_s0/result.json").read_text())
    settings = LowDataSettings.quick(seg_steps=6, seg_resolution=32, seg_batch_size=4)
    (tmp_path / "study").mkdir()
    study = run_arm(Arm("real+classical", None, 1.0), 0, load_study_data("seg", phantom_dir), [], settings,
                    tmp_path / "study")
    assert study["steps"] == bench["steps"] == 6
    assert study["per_image"]["dice"] == bench["per_image"]["dice"]
    assert study["history"]["train_loss"] == bench["history"]["train_loss"]


def test_every_arm_trains_on_what_the_registry_says():
    real, synthetic = [{"file_name": "r"}], [{"file_name": "s"}]
    names = {name: [item["file_name"] for item in arm_items(name, real, synthetic)] for name in ARMS}
    assert names == {"real": ["r"], "real+classical": ["r"], "real+synthetic": ["r", "s"],
                     "real+classical+synthetic": ["r", "s"], "synthetic_pretrain": ["r"], "synthetic": ["s"]}
    assert {name for name, spec in ARMS.items() if spec.augment == "classical"} == {
        "real+classical", "real+classical+synthetic"}


def test_the_resolvable_difference_follows_the_spread_of_the_paired_differences():
    from medaug.segmentation.stats import bootstrap_interval, resolvable_difference

    noise = np.random.default_rng(0).standard_normal(40)
    narrow = bootstrap_interval(list(0.02 + 0.01 * noise))
    wide = bootstrap_interval(list(0.02 + 0.04 * noise))
    # about (1.96 + 0.84) x the standard error of the mean difference
    standard_error = 0.01 * noise.std(ddof=1) / math.sqrt(40)
    assert resolvable_difference(narrow) == pytest.approx(2.8 * standard_error, rel=0.15)
    assert resolvable_difference(wide) == pytest.approx(4 * resolvable_difference(narrow), rel=0.01)
    assert math.isnan(resolvable_difference({"ci_low": math.nan, "ci_high": math.nan}))


def test_the_plateau_is_the_first_validation_near_the_best():
    from medaug.segmentation.train_seg import plateau_step

    assert plateau_step([100, 200, 300, 400], [0.30, 0.52, 0.555, 0.56]) == 300
    assert plateau_step([100, 200, 300], [0.60, 0.40, 0.45]) == 100
    assert plateau_step([], []) is None


def test_light_augmentation_flips_image_and_mask_together_and_nothing_else(tmp_path):
    from PIL import Image

    from medaug.segmentation.transforms import build_transforms

    image = np.zeros((32, 32), np.uint8)
    image[4:12, 2:10] = 255  # a bright block left of centre, its mask the same block
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(image).save(tmp_path / "mask.png")
    item = {"image": str(tmp_path / "image.png"), "mask": str(tmp_path / "mask.png"), "slice_index": -1,
            "label": 0, "file_name": "image.png"}
    transform = build_transforms(32, 1, "stretch", with_masks=True, augment="light")
    transform.set_random_state(seed=0)
    samples = [transform(item) for _ in range(16)]
    flipped = [bool(s["mask"][0, 4:12, 22:30].all()) for s in samples]
    assert 0 < sum(flipped) < 16  # some flipped, some not
    for sample in samples:
        assert torch.equal(sample["image"] > 0.5, sample["mask"] > 0.5)  # together, and no intensity change
        assert set(torch.unique(sample["image"]).tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="augmentation: one of none, light, classical"):
        build_transforms(32, 1, "stretch", with_masks=True, augment=True)


def test_a_recipe_that_cannot_train_names_the_flag():
    from medaug.segmentation.train_seg import SegRecipe

    for bad, flag in (({"schedule": "linear"}, "--schedule"), ({"select": "best"}, "--select"),
                      ({"steps": 0}, "--seg_steps"), ({"resolution": 40}, "--resolution")):
        with pytest.raises(ValueError, match=flag):
            SegRecipe(**bad).check()


def test_fit_segmenter_takes_exactly_its_steps_and_keeps_the_last_weights_unless_asked(phantom_dir):
    from medaug.segmentation.train_seg import SegRecipe, fit_segmenter

    data = load_study_data("seg", phantom_dir)
    recipe = SegRecipe(steps=7, resolution=32, batch_size=4, validations=3)
    model, history = fit_segmenter(data.train, data.val, recipe, seed=0)
    assert history["steps"] == 7 and history["val_steps"] == [3, 6, 7] and history["selected_step"] == 7
    best_model, best = fit_segmenter(data.train, data.val, replace(recipe, select="best_val"), seed=0)
    assert best["val_dice"] == history["val_dice"] and best["selected_step"] == best["best_step"]
    assert best["best_val_dice"] == max(best["val_dice"])


def test_bench_flags_default_to_the_engine_recipe():
    import inspect

    from medaug.commands.bench import bench_command
    from medaug.segmentation.train_seg import SegRecipe

    parameters = inspect.signature(bench_command).parameters
    for name in ("steps", "fit", "select", "batch_size", "resolution"):
        assert parameters[name].default == getattr(SegRecipe(), name), name


def test_with_ema_the_tested_weights_are_the_moving_average(phantom_dir):
    from medaug.segmentation.train_seg import SegRecipe, fit_segmenter

    data = load_study_data("seg", phantom_dir)
    recipe = SegRecipe(steps=5, resolution=32, batch_size=4, validations=1)
    last, _ = fit_segmenter(data.train, [], recipe, seed=0)
    averaged, _ = fit_segmenter(data.train, [], replace(recipe, ema=0.5), seed=0)
    first = next(iter(last.state_dict()))
    # the same training trajectory, but the average lags behind the last weights
    assert not torch.equal(last.state_dict()[first], averaged.state_dict()[first])
    with pytest.raises(ValueError, match="--ema"):
        SegRecipe(ema=1.0).check()
