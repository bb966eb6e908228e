"""`medaug demo` at tiny settings: every stage runs, the report shows real and generated images, reruns resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from medaug.cli import app
from medaug.demo import STAGES, DemoError, DemoSettings, run_demo
from tests.test_report import coloured_pixels, dark_fraction, screenshot

TINY = DemoSettings(phantom_images=16, phantom_size=64, preset="tiny", resolution=64, vae_steps=2, finetune_steps=2,
                    controlnet_steps=2, train_batch_size=2, inference_steps=2, encoder_steps=2, seg_resolution=32,
                    seg_steps=4, seg_seeds=2, segmenter_epochs=1)


def run_tiny(output_dir, settings=TINY, **options):
    announced = []
    report = run_demo(output_dir, settings=settings, on_stage=lambda n, total, title, done: announced.append(
        (title, done)), **options)
    return report, announced


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    report, announced = run_tiny(output_dir)
    return output_dir, report, announced


def test_every_stage_runs_and_leaves_its_outputs(demo):
    output_dir, report, announced = demo
    assert [title for title, _ in announced] == [title for title, _ in STAGES.values()]
    assert not any(done for _, done in announced)
    unet = json.loads((output_dir / "finetune" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 5  # the default generator: the UNet reads each mask as an input channel
    records = {name: json.loads((output_dir / "stages" / f"{name}.json").read_text()) for name in STAGES}
    assert "skipped" in records["controlnet"]["result"] and not (output_dir / "controlnet").exists()
    assert (output_dir / "consistency_segmenter" / "fidelity_segmenter.json").is_file()
    finetune_args = json.loads((output_dir / "finetune" / "medaug_args.json").read_text())["arguments"]
    assert finetune_args["consistency_segmenter"] == str(output_dir / "consistency_segmenter")
    fidelity = records["evaluate"]["result"]["label_fidelity"]
    assert fidelity["pairs"] > 0 and 0 <= fidelity["share_above_0_5"] <= 1
    train_rows = records["data"]["result"]["splits"]["train"]
    assert records["generate"]["result"]["total"] == train_rows * TINY.num_per_source
    assert len(list((output_dir / "synthetic" / "masks").glob("*.png"))) == train_rows * TINY.num_per_source
    arms = {group["arm"] for group in records["segmentation"]["result"]["groups"]}
    assert arms == {"real", "real+synthetic"}
    assert np.isfinite(records["evaluate"]["result"]["metrics"]["frechet_distance"])


def test_the_demo_segments_through_the_one_engine(demo):
    from medaug.segmentation.arms import train_seg_arm
    from medaug.segmentation.inputs import load_study_data
    from medaug.segmentation.train_seg import SegRecipe

    output_dir, _, _ = demo
    shown = json.loads((output_dir / "segmentation" / "runs" / "real_f1_r0_s0" / "result.json").read_text())
    data = load_study_data("seg", output_dir / "data")
    direct = train_seg_arm("real", data.train, [], data.val, data.test,
                           SegRecipe(steps=TINY.seg_steps, resolution=TINY.seg_resolution), seed=0)
    assert shown["steps"] == TINY.seg_steps and direct["per_image"]["dice"] == shown["per_image"]["dice"]


def test_report_links_every_stage_and_embeds_pairs(demo):
    output_dir, report, _ = demo
    text = report.read_text()
    for folder in ("data/", "base/", "finetune/", "synthetic/", "evaluate/report.html",
                   "segmentation/results.md"):
        assert f'href="{folder}' in text, folder
        assert (output_dir / folder.rstrip("/")).exists()
    assert "label fidelity" in text and "ControlNet</h2><p>Not trained" in text
    pairs = re.search(r'<div class="pairs">(.*?)</div>', text, re.S).group(1)
    assert pairs.count("<figure>") == 8 and pairs.count('alt="real: ') == 8 and pairs.count('alt="generated: ') == 8


def test_report_shows_generated_images_beside_real_ones_in_chromium(demo, tmp_path):
    _, report, _ = demo
    shown = screenshot(report, tmp_path / "report.png")
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', report.read_text()))
    control = screenshot(blank, tmp_path / "blank.png")
    red = (255, 38, 38)  # the mask outlines drawn on both images of every pair
    assert coloured_pixels(shown, red) > 200 and coloured_pixels(control, red) == 0
    assert dark_fraction(shown) > 3 * dark_fraction(control)


def test_rerun_skips_finished_stages_and_resumes_the_rest(demo):
    output_dir, _, _ = demo
    for name in ("evaluate", "segmentation"):
        (output_dir / "stages" / f"{name}.json").unlink()  # as if the run had been killed during evaluate
    _, announced = run_tiny(output_dir)
    rerun = [title for title, finished in announced if not finished]
    assert rerun == [STAGES["evaluate"][0], STAGES["segmentation"][0]]
    study = json.loads((output_dir / "stages" / "segmentation.json").read_text())
    assert len(study["result"]["groups"]) == 2  # its finished runs were reloaded, not lost


def test_other_settings_in_the_same_folder_are_refused(demo):
    output_dir, _, _ = demo
    changed = DemoSettings(**{**TINY.__dict__, "finetune_steps": 3})
    with pytest.raises(DemoError, match=r"other settings \(finetune_steps\).*--overwrite"):
        run_tiny(output_dir, changed)


def test_the_controlnet_generator_trains_a_controlnet_and_generates_from_it(tmp_path):
    settings = DemoSettings(**{**TINY.__dict__, "generator": "controlnet", "seg_seeds": 2, "seg_steps": 4})
    report, _ = run_tiny(tmp_path / "out", settings)
    assert (tmp_path / "out" / "controlnet" / "controlnet" / "config.json").is_file()
    entries = [json.loads(line) for line in (tmp_path / "out" / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert entries and all(entry["model_dir"].endswith("controlnet") for entry in entries)
    assert 'href="controlnet/' in report.read_text()
    with pytest.raises(DemoError, match="--generator: unknown generator 'gan'"):
        run_tiny(tmp_path / "other", DemoSettings(**{**TINY.__dict__, "generator": "gan"}))


def test_bad_data_folder_is_named(tmp_path):
    (tmp_path / "not-a-dataset").mkdir()
    result = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "not-a-dataset"), "--output_dir",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "not-a-dataset is not a dataset folder" in result.output
    assert not (tmp_path / "out").exists()
