"""benchmarks/busi_lowdata_study.py --quick: runs the study and records its rows, wall time and command."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("busi_lowdata_study", REPO_ROOT / "benchmarks" / "busi_lowdata_study.py")
busi_lowdata_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(busi_lowdata_study)


def test_quick_run_records_the_summary_rows(phantom_dir, tmp_path, one_torch_thread):
    arguments = ["--quick", "--data", str(phantom_dir), "--output_dir", str(tmp_path / "study"),
                 "--real_fractions", "0.5", "--generators", "pix2pix"]
    record = busi_lowdata_study.main(busi_lowdata_study.parse_args(arguments))
    saved = json.loads((tmp_path / "study" / "benchmark.json").read_text())
    arms = {(row["arm"], row["generator"]) for row in saved["rows"]}
    assert ("real", None) in arms and ("synthetic_pretrain", "pix2pix") in arms and len(arms) == 5
    assert saved["wall_seconds"] > 0 and "--quick" in saved["command"] and json.dumps(saved["rows"]) == json.dumps(record["rows"])
