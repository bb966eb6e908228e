"""benchmarks/fidelity_variants.py --smoke: every variant trains in increments, resumes, and is scored."""

from __future__ import annotations

import importlib.util
import json

from medaug.training.loss_log import LOSS_HISTORY, read_loss_history
from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("fidelity_variants", REPO_ROOT / "benchmarks" / "fidelity_variants.py")
fidelity_variants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidelity_variants)


def test_smoke_run_scores_each_variant_at_each_checkpoint_and_continues(tmp_path, one_torch_thread):
    arguments = ["--smoke", "--work", str(tmp_path), "--variants", "controlnet_filled,mask_channels",
                 "--checkpoints", "1,2"]
    points = fidelity_variants.main(fidelity_variants.parse_args(arguments))
    assert [(p["variant"], p["steps"]) for p in points] == [("controlnet_filled", 1), ("controlnet_filled", 2),
                                                             ("mask_channels", 1), ("mask_channels", 2)]
    assert all(p["pairs"] > 0 and 0 <= p["share_above_0_5"] <= 1 for p in points)
    history = read_loss_history(tmp_path / "mask_channels" / LOSS_HISTORY)
    assert [line["step"] for line in history] == [1, 2]  # the second point resumed the first run's checkpoint
    saved = json.loads((tmp_path / "fidelity_curves.json").read_text())["points"]
    assert saved == points and (tmp_path / "fidelity_curves.png").is_file()
    again = fidelity_variants.main(fidelity_variants.parse_args(arguments))  # nothing left to measure
    assert again == points
