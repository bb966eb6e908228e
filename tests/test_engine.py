"""One segmentation engine: the same arm, data, recipe and seed give the same per-image Dice through `medaug bench`
(and the demo, which calls it) and through `medaug study`'s arms."""

from __future__ import annotations

import json

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
