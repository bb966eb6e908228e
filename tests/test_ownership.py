"""Nothing of the user's is deleted or overwritten: a command refuses a folder it reads as its output, and a
non-empty folder holding no output of its own (--overwrite included, which replaces only medaug's previous
output); the user's folder is checksummed before and after each refusal and each --overwrite."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import read_manifest
from medaug.data.manifest import file_sha256
from medaug.demo import DemoError, open_demo_folder, run_demo
from medaug.generate import generate
from medaug.synthetic import remove_generated
from tests.test_demo import TINY

runner = CliRunner()


def checksums(root) -> dict:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def users_folder(tmp_path):
    """A folder of the user's: notes, a README, results and a report of their own."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("README.md", "results.json", "summary.json", "report.html", "notes.txt"):
        (folder / name).write_text(f"the user's {name}")
    return folder


def invoke(*args):
    """Exit code and text; a refusal the command leaves to `medaug`'s error handler (a ValueError) counts too."""
    result = runner.invoke(app, [str(arg) for arg in args])
    refused = result.exception if isinstance(result.exception, ValueError) else ""
    return result.exit_code, " ".join(f"{result.output} {refused}".split())


@pytest.mark.parametrize("command", [
    ["bench", "seg", "--data", "D", "--output_dir", "O", "--steps", "2", "--seeds", "2", "--resolution", "32"],
    ["study", "seg", "--data", "D", "--output_dir", "O", "--quick"],
    ["ssl", "--data", "D", "--output_dir", "O", "--steps", "1", "--resolution", "32"],
    ["demo", "--data", "D", "--output_dir", "O", "--overwrite"],
    ["edges", "D", "--output_dir", "O", "--overwrite"],
    ["train-encoder", "D", "--output_dir", "O", "--max_train_steps", "1", "--resolution", "32"],
])
def test_a_folder_of_the_user_s_is_refused_and_left_as_it_was(command, phantom_dir, users_folder):
    before, data = checksums(users_folder), checksums(phantom_dir)
    code, output = invoke(*[{"D": phantom_dir, "O": users_folder}.get(arg, arg) for arg in command])
    assert code != 0 and "choose" in output, output
    assert checksums(users_folder) == before and checksums(phantom_dir) == data


@pytest.mark.parametrize("command", [
    ["bench", "seg", "--data", "D", "--output_dir", "D"],
    ["study", "seg", "--data", "D", "--output_dir", "D", "--quick"],
    ["ssl", "--data", "D", "--output_dir", "D"],
    ["demo", "--data", "D", "--output_dir", "D", "--overwrite"],
    ["export", "D", "--output_dir", "D", "--overwrite"],
])
def test_an_input_folder_is_never_an_output_folder(command, phantom_dir, tmp_path):
    data = shutil.copytree(phantom_dir, tmp_path / "data")
    before = checksums(data)
    code, output = invoke(*[data if arg == "D" else arg for arg in command])
    assert code != 0, output
    assert checksums(data) == before


def test_generate_overwrite_removes_only_what_generate_wrote(phantom_dir, tiny_model_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from tests.model_folders import random_controlnet

    monkeypatch.setattr("medaug.training.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    net = tmp_path / "controlnet"
    random_controlnet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")).save_pretrained(
        net, safe_serialization=True)
    data = shutil.copytree(phantom_dir, tmp_path / "data")
    before = checksums(data)
    options = dict(base_model=str(tiny_model_dir), controlnet=str(net), num_inference_steps=1, max_sources=2)
    with pytest.raises(ValueError, match="is the --from_masks folder"):
        generate(None, data, from_masks=data, overwrite=True, **options)
    assert checksums(data) == before  # the dataset generate reads is never its output
    output = tmp_path / "synthetic"
    generate(None, output, from_masks=data, **options)
    assert all(entry.source_sha256 == file_sha256(data / entry.source_file_name) for entry in read_manifest(output))
    (output / "images" / "mine.png").write_bytes(b"the user's image")
    (output / "notes.txt").write_text("mine")
    generate(None, output, from_masks=data, overwrite=True, seed=1, **options)
    assert (output / "images" / "mine.png").read_bytes() == b"the user's image" and (output / "notes.txt").is_file()
    remove_generated(output)
    assert sorted(p.name for p in output.rglob("*") if p.is_file()) == ["mine.png", "notes.txt"]
    plain = tmp_path / "plain"  # a folder generate never wrote: refused, --overwrite or not
    shutil.copytree(data / "images", plain / "images")
    with pytest.raises(FileExistsError, match="was not written by medaug generate"):
        generate(None, plain, from_masks=data, overwrite=True, **options)


def test_demo_overwrite_removes_its_own_entries_only(phantom_dir, tmp_path):
    output = tmp_path / "demo"
    open_demo_folder(output, None, TINY, overwrite=False)  # what a demo's first stage finds and records
    for name in ("base", "synthetic", "segmentation"):
        (output / name).mkdir()
        (output / name / "weights").write_text("the demo's")
    (output / "report.html").write_text("the demo's")
    (output / "notes.txt").write_text("mine")
    (output / "mine").mkdir()
    open_demo_folder(output, None, replace(TINY, seed=1), overwrite=True)
    assert sorted(path.name for path in output.iterdir()) == ["demo.json", "mine", "notes.txt", "stages"]
    inside = shutil.copytree(phantom_dir, output / "mine" / "data")  # the user's data in the demo's folder
    before = checksums(inside)
    with pytest.raises(DemoError, match="lies in --output_dir"):
        run_demo(output, data=inside, settings=TINY, overwrite=True)
    assert checksums(inside) == before


def test_a_training_script_keeps_the_user_s_readme(tiny_model_dir, phantom_dir, users_folder):
    from medaug.outputs import OutputFolderError
    from tests.model_folders import finetuned_folder

    before = checksums(users_folder)
    with pytest.raises(OutputFolderError, match="README.md, notes.txt, report.html and 2 more, which a medaug "
                                                "training run did not write"):
        finetuned_folder(tiny_model_dir, phantom_dir, users_folder)
    assert checksums(users_folder) == before


def test_embed_replaces_its_own_file_and_refuses_the_user_s(phantom_dir, tiny_model_dir, tmp_path):
    encoder = tiny_model_dir / "image_encoder"
    output = tmp_path / "v.safetensors"
    for _ in range(2):  # a rerun replaces what embed wrote
        code, text = invoke("embed", phantom_dir, "--model_path", encoder, "--output", output)
        assert code == 0, text
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's file")
    code, text = invoke("embed", phantom_dir, "--model_path", encoder, "--output", mine)
    assert code == 2 and "was not written by medaug embed" in text
    assert mine.read_bytes() == b"the user's file"
