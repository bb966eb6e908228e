"""The `medaug` command: help on every subcommand, env, inspect's exit codes, init-model, phantom."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app

runner = CliRunner()
SUBCOMMANDS = {
    "env": ["--json"],
    "inspect": ["--split", "--skip_images", "--json"],
    "init-model": ["--output_dir", "--preset", "--prompts_from", "--seed", "--overwrite"],
    "phantom": ["--output_dir", "--num_images", "--size", "--seed", "--overwrite"],
    "embed": ["--output", "--model_path", "--import_file", "--key_column", "--value_column", "--match_column",
              "--shape", "--tokens", "--split", "--batch_size"],
    "evaluate": ["--real", "--synthetic", "--output_dir", "--features", "--inception_weights", "--model_path",
                 "--encoder_dir", "--real_split", "--synthetic_split", "--save_features", "--nearest_k",
                 "--kid_subsets", "--copy_threshold", "--max_images", "--batch_size", "--device", "--diversity_pairs",
                 "--fit", "--kid_subset_size", "--memorisation_space", "--seed", "--fidelity_segmenter",
                 "--fidelity_epochs", "--fidelity_resolution"],
    "train-encoder": ["--output_dir", "--split", "--max_train_steps", "--train_batch_size", "--learning_rate",
                      "--resolution", "--overwrite", "--channels", "--device", "--fit", "--max_train_samples", "--seed",
                      "--temperature"],
    "bench": ["--data", "--synthetic", "--output_dir", "--network", "--resolution", "--steps", "--seeds",
              "--synthetic_ratios", "--real_fractions", "--arms", "--batch_size", "--learning_rate",
              "--label_column", "--gradcam_images", "--device", "--num_threads", "--channels", "--fit",
              "--select", "--allow_unknown_provenance", "--config"],
    "edges": ["--method", "--output_dir", "--split", "--low", "--high", "--thickness", "--overwrite"],
    "export": ["--output_dir", "--format", "--overwrite"],
    "patches": ["--output_dir", "--size", "--level", "--tissue_threshold", "--max_patches_per_slide",
                "--val_fraction", "--test_fraction", "--seed", "--overwrite"],
    "demo": ["--data", "--output_dir", "--max_train_samples", "--resolution", "--finetune_steps", "--controlnet_steps",
             "--seg_steps", "--seg_seeds", "--overwrite", "--generator", "--consistency", "--no_consistency"],
    "ssl": ["--data", "--output_dir", "--method", "--policies", "--clahe", "--no_clahe", "--label_column",
            "--positive_label", "--ignore_labels", "--synthetic", "--synthetic_policies", "--allow_unknown_provenance",
            "--resolution", "--steps", "--supervised_steps", "--supervised_policy", "--batch_size", "--learning_rate",
            "--seeds", "--gradcam_images", "--device", "--config"],
    "generate": ["--model_dir", "--output_dir", "--edges", "--from_masks", "--from_images", "--prompt",
                 "--embeddings_file", "--split", "--num_per_source", "--num_inference_steps", "--guidance_scale",
                 "--controlnet_conditioning_scale", "--scheduler", "--precision", "--compile", "--seed",
                 "--batch_size", "--resolution", "--resume", "--overwrite", "--max_sources", "--base_model", "--lora_weights",
                 "--controlnet", "--config"],
}


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_every_registered_subcommand_is_covered_here():
    registered = {command.name for command in app.registered_commands}
    assert registered == set(SUBCOMMANDS)


def declared_flags(name: str) -> set[str]:
    """The long options the subcommand really takes, read from its click command (not from help text); hidden old
    names (tests/test_flags.py checks them) left out."""
    import typer

    command = typer.main.get_command(app).commands[name]
    options = [option for parameter in command.params if not getattr(parameter, "hidden", False)
               for option in [*parameter.opts, *parameter.secondary_opts]]
    return {option for option in options if option.startswith("--")}


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_takes_exactly_the_listed_flags_and_shows_them(name):
    assert declared_flags(name) == set(SUBCOMMANDS[name])
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})  # wide, so long flags are not cut
    assert result.exit_code == 0, result.output
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?![\w-])", result.output))
    assert set(SUBCOMMANDS[name]) <= shown  # whole flags: --real_split does not stand in for --real


def test_env_reports_versions_and_accelerators():
    result = invoke("env", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "monai"):
        assert report["packages"][package], package
    assert isinstance(report["cuda_available"], bool) and isinstance(report["xformers_installed"], bool)
    assert report["train_attention_cpu"] == ("SDPA forward, matmul backward (bf16 on a CPU)"
                                             if report["cpu_bf16_native"] else "SDPA")


def test_inspect_summarises_a_clean_folder(phantom_dir):
    result = invoke("inspect", phantom_dir, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rows"] == 20 and summary["with_mask"] == 20 and summary["problems"] == []
    assert summary["splits"] == {"train": 14, "val": 2, "test": 4}
    assert set(summary["labels"]) == {"round", "irregular"}
    assert 0.01 < summary["mask_coverage"]["mean"] < 0.2


def test_inspect_lists_a_corrupt_png_and_a_wrong_size_mask(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((24, 32), 90, dtype=np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(np.zeros((24, 32), dtype=np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((10, 32), dtype=np.uint8)).save(tmp_path / "masks" / "c.png")
    pd.DataFrame({"file_name": [f"images/{n}.png" for n in "abc"],
                  "mask_file_name": [f"masks/{n}.png" for n in "abc"]}).to_csv(tmp_path / "metadata.csv", index=False)
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # undo terminal wrapping
    assert "2 problem(s)" in output
    assert "row 2, column 'file_name', images/b.png: cannot read image" in output
    assert "row 3, column 'mask_file_name', masks/c.png: size 32x10 differs" in output


def test_inspect_names_a_missing_folder(tmp_path):
    result = invoke("inspect", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "nowhere: 1 problem(s)" in " ".join(result.output.split())


def test_phantom_then_init_model_with_its_prompts(tmp_path):
    data = tmp_path / "data"
    assert invoke("phantom", "--output_dir", data, "--num_images", 6, "--size", 48).exit_code == 0
    assert invoke("phantom", "--output_dir", data).exit_code == 2  # never writes over a dataset unasked
    assert invoke("phantom", "--output_dir", data, "--num_images", 6, "--size", 48, "--overwrite").exit_code == 0
    model = tmp_path / "model"
    result = invoke("init-model", "--output_dir", model, "--preset", "tiny", "--prompts_from", data)
    assert result.exit_code == 0, result.output
    assert "unet" in result.output and (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    vocabulary = json.loads((model / "tokenizer" / "vocab.json").read_text())
    assert "phantom</w>" in vocabulary and "irregular</w>" in vocabulary
    again = invoke("init-model", "--output_dir", model)
    assert again.exit_code == 2 and "--output_dir" in again.output and "--overwrite" in again.output
    bad = invoke("init-model", "--output_dir", tmp_path / "other", "--preset", "huge")
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.output


STUDY_SEG_FLAGS = ["--data", "--output_dir", "--real_fractions", "--seeds", "--subset_draws", "--generators", "--arms",
                   "--synthetic_ratio", "--mask_augment", "--filter", "--unlabelled_images", "--seg_steps",
                   "--seg_resolution", "--diffusion_steps", "--pix2pix_steps", "--autoencoder_steps", "--gan_steps",
                   "--quick",
                   "--config"]


def test_study_seg_takes_exactly_the_listed_flags_and_shows_them():
    import typer

    command = typer.main.get_command(app).commands["study"].commands["seg"]
    declared = {option for parameter in command.params for option in parameter.opts if option.startswith("--")}
    assert declared == set(STUDY_SEG_FLAGS)
    result = runner.invoke(app, ["study", "seg", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert set(STUDY_SEG_FLAGS) <= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?![\w-])", result.output))


def test_bench_s_table_keeps_every_arm_and_fraction_readable_at_80_columns():
    """In a log file (80 columns) the key columns must not be squeezed to nothing by the metric columns."""
    from rich.console import Console

    from medaug.console import print_table

    arms = ["real", "real+classical", "real+classical+synthetic", "synthetic_pretrain"]
    metrics = ["Dice", "IoU", "HD95 px", "Dice (lesion images)"]
    rows = [[arm, "0.25", "1", "137+137", "3"] + ["0.521 [0.500, 0.540]"] * len(metrics) for arm in arms]
    narrow = Console(width=80, record=True, color_system=None)
    print_table("medaug bench seg", ["arm", "fraction", "ratio"], ["train", "seeds"] + metrics, rows, target=narrow)
    lines = narrow.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    assert all(sum(f" {metric} ┃" in line for line in lines) == 1 for metric in metrics)
    for arm in arms:  # each arm's name whole on one line, in every table the columns were split over
        assert sum(f" {arm} " in line for line in lines) == 1 + len(metrics)
        assert sum(f" {arm} " in line and " 0.521 [0.500, 0.540] " in line for line in lines) == len(metrics)
    wide = Console(width=200, record=True, color_system=None)
    print_table("medaug bench seg", ["arm", "fraction", "ratio"], ["train", "seeds"] + metrics, rows, target=wide)
    assert sum(" real+classical+synthetic " in line for line in wide.export_text().splitlines()) == 1
