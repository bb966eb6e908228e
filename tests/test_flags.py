"""The training scripts' command lines: help with defaults on every flag, one name per idea, diffusers' flags that
work or are refused with the reason, --config files and run replay, validation images in the trackers."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medaug.cli import app
from medaug.scripts import finetune, train_pix2pix
from medaug.speed import training_precision
from medaug.training.arguments import RefusedFlag, epoch_steps, train_steps
from medaug.training.validation import log_to_trackers

SCRIPTS = ("finetune", "train_controlnet", "train_vae", "train_pix2pix", "train_autoencoder", "train_gan")
runner = CliRunner()


def base_flags(tiny_model_dir, data) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(data)]


# ---------------------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_that_shows_its_default(name):
    parser = importlib.import_module(f"medaug.scripts.{name}").build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        if action.help == argparse.SUPPRESS:  # hidden: only diffusers' flags refused with a reason
            assert isinstance(action, RefusedFlag) and action.reason, flag
            continue
        assert action.help and action.help.strip(), f"{name} {flag}: no help"
        shown = formatter._expand_help(action)
        expected = "(required)" if action.required else f"(default: {action.default})"
        assert expected in shown, f"{name} {flag}: help does not show its default: {shown!r}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_diffusers_spellings_and_the_config_flag(name, capsys):
    script = importlib.import_module(f"medaug.scripts.{name}")
    with pytest.raises(SystemExit) as leaving:
        script.parse_args(["--help"])
    assert leaving.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--config", "--dataset_name", "--num_train_epochs", "--center_crop", "--allow_tf32",
                 "--max_train_samples" if name != "train_vae" else "--max_eval_images"):
        assert flag in shown, f"{name}: {flag} not in --help"
    if name in ("finetune", "train_controlnet"):
        assert "--latent_cache_dir" in shown and "Hugging Face Hub cache" in shown and "--push_to_hub" in shown


# ---------------------------------------------------------------------------------------------------------
# diffusers' flags
# ---------------------------------------------------------------------------------------------------------

def test_epochs_become_steps_as_diffusers_counts_them():
    assert epoch_steps(rows=4, batch_size=2) == 2
    assert epoch_steps(rows=5, batch_size=2) == 2  # the partial batch is dropped
    assert epoch_steps(rows=1, batch_size=2) == 1  # ... unless it is the only one
    assert epoch_steps(rows=8, batch_size=2, accumulation=2) == 2
    assert epoch_steps(rows=8, batch_size=2, processes=2) == 2
    assert train_steps(None, 3, steps_per_epoch=2, default=1000) == 6
    assert train_steps(5, 3, steps_per_epoch=2, default=1000) == 5  # --max_train_steps wins, as in diffusers
    assert train_steps(None, None, steps_per_epoch=2, default=1000) == 1000


def test_a_run_with_diffusers_flags_replays_from_its_record(tiny_model_dir, phantom_dir, tmp_path, one_torch_thread):
    """One short run: --dataset_name (a local folder), --num_train_epochs, --center_crop and --allow_tf32 work; its
    validation images reach TensorBoard; its record replays it with the precision it used."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "run"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        summary = finetune.main(finetune.parse_args([
            "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_name", str(phantom_dir),
            "--output_dir", str(output_dir), "--latent_cache_dir", str(tmp_path / "cache"), "--num_train_epochs", "2",
            "--max_train_samples", "4", "--train_batch_size", "2", "--center_crop", "--allow_tf32",
            "--validation_steps", "4", "--num_validation_images", "2", "--validation_inference_steps", "1"]))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert summary["global_step"] == 4  # 2 epochs x 4 rows / batch 2
    record = json.loads((output_dir / "medaug_args.json").read_text())
    arguments = record["arguments"]
    assert arguments["fit"] == "crop" and record["fit"] == "crop"
    assert arguments["train_data_dir"] == str(phantom_dir) and arguments["max_train_steps"] == 4
    # what accelerate used ("auto" resolved for this machine), not null
    assert arguments["mixed_precision"] == record["mixed_precision"] == training_precision("auto", "cpu")

    events = next((output_dir / "logs").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0})
    accumulator.Reload()
    assert "validation" in accumulator.Tags()["images"]
    image = accumulator.Images("validation")[0]
    # TensorBoard tiles the two 64 px images side by side
    assert (image.step, image.width, image.height) == (4, 128, 64) and len(image.encoded_image_string) > 100

    replay = finetune.parse_args(["--config", str(output_dir / "medaug_args.json"), "--output_dir",
                                  str(tmp_path / "again")])
    replayed = {key: value for key, value in vars(replay).items() if key not in ("config", "output_dir")}
    assert replayed == {key: value for key, value in arguments.items() if key not in ("config", "output_dir")}
    assert replay.output_dir == str(tmp_path / "again")


def test_hub_dataset_names_are_refused_with_how_to_export(tiny_model_dir, phantom_dir, tmp_path):
    with pytest.raises(ValueError, match="--dataset_name someone/busi: medaug reads local dataset folders.*metadata"):
        finetune.parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_name",
                             "someone/busi"])
    with pytest.raises(ValueError, match="name different folders"):
        finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), "--dataset_name", str(tmp_path)])
    with pytest.raises(ValueError, match="give --train_data_dir"):
        train_pix2pix.parse_args([])


@pytest.mark.parametrize("flag", ["--push_to_hub", "--use_8bit_adam", "--revision=main"])
def test_diffusers_flags_medaug_cannot_honour_exit_2_with_the_reason(flag, tiny_model_dir, phantom_dir, capsys):
    with pytest.raises(SystemExit) as leaving:
        finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), flag])
    assert leaving.value.code == 2
    assert f"argument {flag.split('=')[0]}: " in capsys.readouterr().err


def test_cache_dir_is_the_hub_cache_and_latent_cache_dir_the_latent_cache(tiny_model_dir, phantom_dir, tmp_path):
    args = finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), "--cache_dir", str(tmp_path / "hub"),
                                "--latent_cache_dir", str(tmp_path / "latents")])
    assert (args.cache_dir, args.latent_cache_dir) == (str(tmp_path / "hub"), str(tmp_path / "latents"))
    assert finetune.parse_args(base_flags(tiny_model_dir, phantom_dir)).cache_dir is None


# ---------------------------------------------------------------------------------------------------------
# --config
# ---------------------------------------------------------------------------------------------------------

def test_a_yaml_config_sets_flags_and_the_command_line_wins(tiny_model_dir, phantom_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrained_model_name_or_path: {tiny_model_dir}\ntrain_data_dir: {phantom_dir}\n"
                      "rank: 8\nresolution: 32\nrandom_flip: true\nembedding_shape: [4, 8]\n")
    args = finetune.parse_args(["--config", str(config), "--rank", "2"])
    assert (args.rank, args.resolution, args.random_flip, args.embedding_shape) == (2, 32, True, [4, 8])
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"train_data_dir": str(phantom_dir), "generator_channels": [16, 32]}))
    assert train_pix2pix.parse_args(["--config", str(json_config)]).generator_channels == [16, 32]


def test_config_names_and_values_are_checked(tiny_model_dir, phantom_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("resolutoin: 64\nbogus: 1\nrank: 2\n")
    with pytest.raises(ValueError, match=r"unknown flag\(s\) bogus, resolutoin;"):
        finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), "--config", str(config)])
    config.write_text("fit: zoom\n")
    with pytest.raises(SystemExit):
        finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), "--config", str(config)])
    assert "argument --fit: invalid choice: 'zoom'" in capsys.readouterr().err
    config.write_text("push_to_hub: false\nrank: 2\n")  # a diffusers config's switched-off flag is no refusal
    assert finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), "--config", str(config)]).rank == 2
    config.write_text("push_to_hub: true\n")
    with pytest.raises(SystemExit):
        finetune.parse_args([*base_flags(tiny_model_dir, phantom_dir), "--config", str(config)])
    assert "argument --push_to_hub: medaug never uploads" in capsys.readouterr().err
    config.write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        finetune.parse_args(["--config", str(config)])


def test_a_record_replays_only_with_the_script_that_wrote_it(tmp_path):
    record = tmp_path / "medaug_args.json"
    record.write_text(json.dumps({"script": "train_controlnet", "version": 2, "base_model": "x",
                                  "arguments": {"rank": 4}}))
    with pytest.raises(ValueError, match="records a train_controlnet run; replay it with "
                                         "python -m medaug.scripts.train_controlnet$"):
        finetune.parse_args(["--config", str(record)])


def test_medaug_commands_take_config_files_and_command_line_flags_win(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text(f"task: seg\ndata: {tmp_path / 'from-config'}\noutput_dir: {tmp_path / 'out'}\nsteps: 2\n")
    result = runner.invoke(app, ["bench", "--config", str(config)])
    assert result.exit_code == 2 and "from-config" in result.output
    result = runner.invoke(app, ["bench", "--config", str(config), "--data", str(tmp_path / "typed")])
    assert result.exit_code == 2 and "typed" in result.output and "from-config" not in result.output
    study = tmp_path / "study.yaml"
    study.write_text(f"data: {tmp_path / 'study-data'}\noutput_dir: {tmp_path / 'study'}\nfilter: 0.5\n"
                     "real_fractions: [0.1, 0.25]\n")
    result = runner.invoke(app, ["study", "seg", "--config", str(study)])
    assert result.exit_code == 2 and "study-data" in result.output
    unknown = tmp_path / "generate.json"
    unknown.write_text(json.dumps({"output_dir": str(tmp_path / "synthetic"), "num_images": 3}))
    result = runner.invoke(app, ["generate", "--config", str(unknown)])
    assert result.exit_code == 2 and "unknown flag(s) num_images" in " ".join(result.output.split())


# ---------------------------------------------------------------------------------------------------------
# One name per idea
# ---------------------------------------------------------------------------------------------------------

def test_demo_takes_max_train_samples_and_its_old_name_hidden(tmp_path, monkeypatch):
    import medaug.demo

    seen = []
    monkeypatch.setattr(medaug.demo, "run_demo", lambda output_dir, data, settings, **_: seen.append(settings)
                        or tmp_path / "report.html")
    shown = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output
    assert "--max_train_samples" in shown and "--max_train_images" not in shown
    for flag in ("--max_train_samples", "--max_train_images"):
        result = runner.invoke(app, ["demo", "--output_dir", str(tmp_path / flag), flag, "7"])
        assert result.exit_code == 0, result.output
    assert [settings.max_train_samples for settings in seen] == [7, 7]
    both = runner.invoke(app, ["demo", "--output_dir", str(tmp_path / "both"), "--max_train_samples", "7",
                               "--max_train_images", "8"])
    assert both.exit_code == 2 and "old name of --max_train_samples" in both.output


# ---------------------------------------------------------------------------------------------------------
# Validation images in trackers
# ---------------------------------------------------------------------------------------------------------

def test_validation_images_reach_wandb_as_wandb_images(monkeypatch):
    """wandb is not installed here: a stand-in module and tracker record what would be sent."""
    class StandInImage:
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=StandInImage))
    logged = []
    wandb_tracker = types.SimpleNamespace(name="wandb", log=lambda values, step: logged.append((values, step)))
    silent = types.SimpleNamespace(name="mlflow")  # takes no images: skipped, not an error
    images = np.random.default_rng(0).uniform(-0.1, 1.1, size=(2, 8, 8, 3))
    assert log_to_trackers([wandb_tracker, silent], images, step=5) == ["wandb"]
    (values, step), = logged
    assert step == 5 and [image.data.shape for image in values["validation"]] == [(8, 8, 3)] * 2
    sent = np.stack([image.data for image in values["validation"]])
    assert sent.dtype == np.uint8
    np.testing.assert_array_equal(sent, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
