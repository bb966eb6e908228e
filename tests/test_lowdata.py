"""medaug study seg: nested subsets by patient, generators that never see a row outside their subset, the filter's
keep/refuse on hand-made pairs, arms at equal optimiser steps, outputs other tools can read, and resume."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import DatasetFolder
from medaug.lowdata.filter import FilterRule, keep_pairs
from medaug.lowdata.study import LowDataSettings, LowDataStudyError, run_lowdata_study
from medaug.lowdata.subsets import nested_subsets
from medaug.run_record import read_run_record

runner = CliRunner()


def patient_rows(counts: dict[str, int], per_patient: int = 2) -> list[dict]:
    rows, patient = [], 0
    for label, patients in counts.items():
        for _ in range(patients):
            rows += [{"file_name": f"p{patient}_{k}.png", "label": label, "split": "train",
                      "patient_id": f"P{patient}"} for k in range(per_patient)]
            patient += 1
    rows += [{"file_name": "val.png", "label": "benign", "split": "val", "patient_id": "V"},
             {"file_name": "test.png", "label": "benign", "split": "test", "patient_id": "T"}]
    return rows


def test_subsets_are_nested_stratified_and_keep_patients_whole(write_dataset):
    folder = DatasetFolder(write_dataset(patient_rows({"benign": 30, "malignant": 10})))
    subsets = nested_subsets(folder, [0.1, 0.25, 0.5, 1.0], seed=3)
    patients = {f: {folder.value(i, "patient_id") for i in rows} for f, rows in subsets.items()}
    labels = {f: [folder.value(i, "label") for i in rows] for f, rows in subsets.items()}
    assert set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[1.0])
    assert subsets[1.0] == folder.indices("train")
    # 25% of 30 benign patients is 8 (7.5 rounded half up), of 10 malignant 3 (2.5 rounded half up); 2 rows each
    assert labels[0.25].count("benign") == 16 and labels[0.25].count("malignant") == 6
    for fraction, rows in subsets.items():  # a patient's rows come together or not at all
        assert len(rows) == 2 * len(patients[fraction])
    assert nested_subsets(folder, [0.25], seed=4)[0.25] != subsets[0.25]


def test_subsets_refuse_a_fraction_outside_zero_one(write_dataset):
    folder = DatasetFolder(write_dataset(patient_rows({"benign": 4})))
    with pytest.raises(ValueError, match="--real_fractions"):
        nested_subsets(folder, [0.0, 0.5])


def pair(name, lesion, dice=None, predicted=0):
    return {"file_name": name, "lesion": lesion, "dice": dice, "predicted_pixels": predicted}


def test_the_filter_keeps_pairs_the_segmenter_agrees_with():
    pairs = [pair("good", True, 0.8), pair("edge", True, 0.5), pair("bad", True, 0.1),
             pair("empty_clean", False), pair("empty_with_lesion", False, predicted=12)]
    kept, record = keep_pairs(pairs, FilterRule.parse("0.5"))
    assert kept == {"good", "edge", "empty_clean"}
    assert record["kept"] == 3 and record["total"] == 5 and record["acceptance"] == pytest.approx(0.6)
    kept, record = keep_pairs(pairs, FilterRule.parse("q0.5"))  # drop the lower half of the lesion pairs
    assert record["threshold"] == pytest.approx(0.5) and kept == {"good", "edge", "empty_clean"}
    kept, _ = keep_pairs(pairs, FilterRule.parse("0.9"))
    assert kept == {"empty_clean"}


@pytest.mark.parametrize("text", ["high", "1.5", "q1", "q-0.1", ""])
def test_a_bad_filter_rule_names_the_flag(text):
    with pytest.raises(ValueError, match="--filter"):
        FilterRule.parse(text)


def test_settings_refuse_unknown_arms_generators_and_modes():
    for changes, flag in (({"arms": ("real", "realer")}, "--arms"), ({"generators": ("vqgan",)}, "--generators"),
                          ({"unlabelled_images": "some"}, "--unlabelled_images"), ({"filter": "x"}, "--filter"),
                          ({"real_fractions": (0.25, 2.0)}, "--real_fractions")):
        with pytest.raises(LowDataStudyError, match=flag):
            LowDataSettings.quick(**changes).check()


@pytest.fixture(scope="module")
def guarded_phantom(phantom_dir, tmp_path_factory):
    """The phantom with every training image outside the 50% subset replaced by bytes no reader accepts: a stage
    that reads beyond its subset fails."""
    data = tmp_path_factory.mktemp("guarded") / "phantom"
    shutil.copytree(phantom_dir, data)
    folder = DatasetFolder(data)
    inside = set(nested_subsets(folder, [0.5])[0.5])
    outside = [i for i in folder.indices("train") if i not in inside]
    for index in outside:
        folder.path(index, "file_name").write_bytes(b"not an image")
    return data, outside


@pytest.fixture(scope="module")
def quick_study(guarded_phantom, tmp_path_factory):
    data, _ = guarded_phantom
    output = tmp_path_factory.mktemp("study") / "out"
    settings = LowDataSettings.quick(real_fractions=(0.5,), generators=("pix2pix", "mask_channels"),
                                     filter="q0.25")
    summary = run_lowdata_study(data, output, settings)
    return output, settings, summary


def test_generators_learn_from_their_subset_only(guarded_phantom, quick_study):
    data, outside = guarded_phantom
    output, _, _ = quick_study
    subset = DatasetFolder(output / "subsets" / "d0" / "f0.5")
    source = DatasetFolder(data)
    excluded = {source.value(i, "file_name") for i in outside}
    assert excluded and not excluded & {subset.value(i, "file_name") for i in range(len(subset))}
    assert not any((subset.root / name).exists() for name in excluded)
    for generator in ("pix2pix", "mask_channels"):
        record = read_run_record(output / "generators" / "d0" / "f0.5" / generator)
        assert record.train_data_dir == str(subset.root.resolve())


def test_arms_train_equal_steps_and_the_summary_reads_as_documented(quick_study):
    output, settings, summary = quick_study
    rows = summary["rows"]
    assert {(row["arm"], row["generator"]) for row in rows} == {
        ("real", None), ("real+classical", None),
        *{(arm, g) for arm in ("real+synthetic", "real+classical+synthetic", "synthetic_pretrain")
          for g in ("pix2pix", "mask_channels")}}
    for result_file in (output / "runs").glob("*/result.json"):
        result = json.loads(result_file.read_text())
        history = result["history"]
        steps = history["steps"] + history.get("pretrain", {"steps": 0})["steps"]
        assert steps == settings.seg_steps, result_file
    on_disk = json.loads((output / "summary.json").read_text())
    real = next(row for row in on_disk["rows"] if row["arm"] == "real")
    mixed = next(row for row in on_disk["rows"] if row["arm"] == "real+synthetic" and row["generator"] == "pix2pix")
    assert set(real) >= {"arm", "generator", "real_fraction", "mean", "ci_low", "ci_high", "replicates", "draws",
                         "delta_vs_real", "delta_vs_classical"}
    assert mixed["delta_vs_real"]["mean"] == pytest.approx(mixed["mean"] - real["mean"])
    assert mixed["n_synthetic"] == mixed["n_real"]  # --synthetic_ratio 1
    assert math.isnan(mixed["delta_vs_real"]["resolvable"]) or mixed["delta_vs_real"]["resolvable"] > 0
    assert on_disk["learning_curve"][0]["plateau_step"] <= settings.seg_steps
    assert on_disk["task"] == "seg" and on_disk["metric"] == "dice"


def test_pairs_are_scored_filtered_and_shown(quick_study):
    output, _, summary = quick_study
    for generator in summary["generators"]:
        accepted = generator["filter"]
        assert 0 < accepted["kept"] < accepted["total"] == generator["generated"]
        assert math.isfinite(generator["fidelity_ratio"])
    manifest = (output / "synthetic" / "d0" / "f0.5" / "pix2pix" / "manifest.jsonl").read_text().splitlines()
    assert all("label_fidelity_dice" in json.loads(line)["extra"] for line in manifest)
    report = (output / "report.html").read_text()
    assert "Has real-only finished learning?" in report and "filter acceptance" in report
    # plots (Dice, learning curve, fidelity), generated pairs of two generators, 7 arms' predictions on the same images
    predictions = np.load(output / "runs" / "d0_f0.5_real_s0" / "overlay_predictions.npz")["masks"]
    assert report.count("data:image/png;base64,") >= 3 + 2 + 7 * len(predictions) and len(predictions) > 0
    assert "https://" not in report and "<script" not in report


def test_a_rerun_resumes_and_other_settings_are_refused(guarded_phantom, quick_study):
    data, _ = guarded_phantom
    output, settings, summary = quick_study
    results = sorted((output / "runs").glob("*/result.json"))
    stamps = [path.stat().st_mtime_ns for path in results]
    again = run_lowdata_study(data, output, settings)
    assert [path.stat().st_mtime_ns for path in results] == stamps
    assert json.dumps(again["rows"]) == json.dumps(summary["rows"])  # NaN (one seed) compares as text
    fewer = run_lowdata_study(data, output, LowDataSettings.quick(real_fractions=(0.5,), arms=("real",),
                                                                 generators=("pix2pix",), filter="q0.25"))
    assert [row["arm"] for row in fewer["rows"]] == ["real"]  # a smaller plan reuses what is finished
    assert [path.stat().st_mtime_ns for path in results] == stamps
    with pytest.raises(LowDataStudyError, match="seg_steps"):
        run_lowdata_study(data, output, LowDataSettings.quick(real_fractions=(0.5,), seg_steps=8,
                                                             generators=("pix2pix", "mask_channels"),
                                                             filter="q0.25"))


def test_the_command_refuses_bad_flags_by_name(phantom_dir, tmp_path):
    result = runner.invoke(app, ["study", "seg", "--data", str(phantom_dir), "--output_dir", str(tmp_path / "o"),
                                 "--quick", "--arms", "real,more"])
    assert result.exit_code != 0 and "--arms" in result.output
    result = runner.invoke(app, ["study", "seg", "--data", str(tmp_path / "nowhere"), "--output_dir",
                                 str(tmp_path / "o"), "--quick"])
    assert result.exit_code != 0 and "--data" in result.output


def test_the_study_report_shows_plots_and_each_arm_s_predictions_in_chromium(quick_study, tmp_path):
    from tests.test_report import coloured_pixels, screenshot

    output, _, summary = quick_study
    text = (output / "report.html").read_text()
    assert "href=" not in text and "percentile bootstrap interval over subset draws, seeds and test images" in text
    for row in summary["rows"]:
        assert 0.0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1.0, row
    shown = screenshot(output / "report.html", tmp_path / "study.png")
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', text))
    control = screenshot(blank, tmp_path / "blank.png")
    red, plot_blue = (255, 38, 38), (31, 119, 180)  # mask outlines; matplotlib's first colour in the Dice plot
    assert coloured_pixels(shown, red) > 100 and coloured_pixels(control, red) == 0
    assert coloured_pixels(shown, plot_blue) > 50 and coloured_pixels(control, plot_blue) == 0


def test_autoencoder_and_gan_are_arms_and_the_synthetic_arm_trains_on_synthetic_pairs_only(guarded_phantom,
                                                                                         tmp_path):
    data, _ = guarded_phantom
    output = tmp_path / "families"
    settings = LowDataSettings.quick(real_fractions=(0.5,), generators=("autoencoder", "gan"),
                                     arms=("real", "synthetic"))
    summary = run_lowdata_study(data, output, settings)
    rows = {(row["arm"], row["generator"]): row for row in summary["rows"]}
    assert set(rows) == {("real", None), ("synthetic", "autoencoder"), ("synthetic", "gan")}
    subset = (output / "subsets" / "d0" / "f0.5").resolve()
    for generator in ("autoencoder", "gan"):
        record = read_run_record(output / "generators" / "d0" / "f0.5" / generator)
        assert (record.generator, record.generator_condition) == (generator, "mask")
        assert record.train_data_dir == str(subset)
        row = rows[("synthetic", generator)]
        assert row["n_real"] == 0 and row["n_synthetic"] == rows[("real", None)]["n_real"] > 0
    for result_file in (output / "runs").glob("*synthetic*/result.json"):
        result = json.loads(result_file.read_text())
        assert result["n_real"] == 0 and result["n_synthetic"] > 0


def test_subset_draws_are_independent_and_deltas_pair_by_draw_and_seed(phantom_dir, tmp_path):
    output = tmp_path / "draws"
    settings = LowDataSettings.quick(real_fractions=(0.5,), arms=("real", "real+classical"), generators=(),
                                     seeds=2, subset_draws=2)
    summary = run_lowdata_study(phantom_dir, output, settings)
    first, second = (DatasetFolder(output / "subsets" / f"d{d}" / "f0.5") for d in (0, 1))
    train = [{f.value(i, "file_name") for i in f.indices("train")} for f in (first, second)]
    assert train[0] != train[1] and len(train[0]) == len(train[1])  # two draws, same size
    runs = sorted(path.parent.name for path in (output / "runs").glob("*/result.json"))
    assert runs == sorted(f"d{d}_f0.5_{arm}_s{s}" for d in (0, 1) for arm in ("real", "real-classical")
                          for s in (0, 1))
    classical = next(row for row in summary["rows"] if row["arm"] == "real+classical")
    assert (classical["draws"], classical["replicates"]) == (2, 4)
    delta = classical["delta_vs_real"]
    assert delta["replicates"] == 4 and delta["resolvable"] > 0
    assert "2×2" in (output / "results.md").read_text()
