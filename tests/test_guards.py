"""Nothing lost, nothing leaked: output folders checked before any work and held by one run, training that will
not overwrite another run, run folders checked complete, and every expected failure one `error:` line with exit
status 2 (walked below over each path that used to end in a traceback or in silence)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from medaug import cli
from medaug.console import reporting_errors
from medaug.outputs import LOCK_NAME, OutputFolderError, output_lock
from medaug.run_record import CARD_NAME, RECORD_NAME
from medaug.scripts import finetune, train_controlnet, train_vae
from medaug.training.lora import LORA_WEIGHTS_NAME
from tests.model_folders import model_folder  # noqa: F401 (a fixture)

SCRIPTS = {"finetune": finetune, "train_controlnet": train_controlnet, "train_vae": train_vae}


def run_command(argv: list, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `medaug ...` or of a training script, as a user sees them."""
    name, *args = [str(arg) for arg in argv]
    capsys.readouterr()  # what came before is not this command's
    try:
        if name == "medaug":
            cli.main(args)
        else:
            with reporting_errors():
                SCRIPTS[name].main(SCRIPTS[name].parse_args(args))
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def finetune_args(base: Path, data: Path, output_dir: Path, *extra) -> list:
    return ["finetune", "--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", output_dir,
            "--latent_cache_dir", output_dir.parent / "cache", "--max_train_steps", "2", "--train_batch_size", "2",
            "--max_train_samples", "4", "--report_to", "none", "--seed", "0", *extra]


def generate_args(model_dir: Path, data: Path, output_dir: Path) -> list:
    return ["medaug", "generate", "--model_dir", model_dir, "--from_masks", data, "--output_dir", output_dir,
            "--num_inference_steps", "2", "--max_sources", "2"]


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, phantom_dir, tmp_path_factory) -> Path:
    """A finished two-step finetune.py run that kept its checkpoints."""
    output_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    args = finetune_args(tiny_model_dir, phantom_dir, output_dir, "--checkpointing_steps", "1")[1:]
    finetune.main(finetune.parse_args([str(arg) for arg in args]))
    return output_dir


class Inputs:
    """What each bad-input case is built from: a scratch folder, the tiny base, the phantom set, a trained run."""

    def __init__(self, tmp_path, base, data, run, checkpointed):
        self.tmp, self.base, self.data, self.run, self.checkpointed = tmp_path, base, data, run, checkpointed

    def a_file(self) -> Path:
        path = self.tmp / "a_file"
        path.write_text("not a folder")
        return path

    def copy(self, folder: Path, name: str) -> Path:
        return shutil.copytree(folder, self.tmp / name)


def _run_missing_weights(inputs):
    run = inputs.copy(inputs.run, "run")
    (run / LORA_WEIGHTS_NAME).unlink()
    return generate_args(run, inputs.data, inputs.tmp / "out"), f"{LORA_WEIGHTS_NAME} is missing"


def _run_full_without_unet(inputs):
    import json

    run = inputs.copy(inputs.run, "run")  # as a full fine-tune's record says, with its unet/ not copied
    record = json.loads((run / RECORD_NAME).read_text())
    (run / RECORD_NAME).write_text(json.dumps({**record, "unet_train_mode": "full"}))
    return generate_args(run, inputs.data, inputs.tmp / "out"), "unet/diffusion_pytorch_model.safetensors is missing"


def _run_truncated_weights(inputs):
    run = inputs.copy(inputs.run, "run")
    weights = run / LORA_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    return generate_args(run, inputs.data, inputs.tmp / "out"), f"{weights}: not a readable safetensors file"


def _run_pickle_weights(inputs):
    from safetensors.torch import load_file

    run = inputs.copy(inputs.run, "run")
    torch.save(load_file(run / LORA_WEIGHTS_NAME), run / "pytorch_lora_weights.bin")
    (run / LORA_WEIGHTS_NAME).unlink()
    return generate_args(run, inputs.data, inputs.tmp / "out"), r"holds pickle weights \(pytorch_lora_weights.bin\)"


def _run_record_malformed(inputs):
    run = inputs.copy(inputs.run, "run")
    (run / RECORD_NAME).write_text('{"base_model": ')
    return generate_args(run, inputs.data, inputs.tmp / "out"), RECORD_NAME


def _base_pickle_only(inputs):
    from safetensors.torch import load_file

    base = inputs.copy(inputs.base, "base")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), base / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return finetune_args(base, inputs.data, inputs.tmp / "out"), r"unet holds pickle weights only"


def _checkpoint_truncated(inputs):
    run = inputs.copy(inputs.checkpointed, "run")
    damaged = sorted((run / "checkpoint-1").glob("*.safetensors"))[0]
    damaged.write_bytes(damaged.read_bytes()[:64])
    args = finetune_args(inputs.base, inputs.data, run, "--resume_from_checkpoint", "checkpoint-1",
                         "--max_train_steps", "3")
    return args, str(damaged)


def _finished_run(inputs):
    run = inputs.copy(inputs.run, "run")
    return finetune_args(inputs.base, inputs.data, run), "holds a finished finetune run of 2 steps; pass --overwrite"


def _unfinished_run(inputs):
    run = inputs.copy(inputs.checkpointed, "run")
    (run / RECORD_NAME).unlink()  # a run killed before its end has written neither record nor card
    (run / CARD_NAME).unlink()
    return finetune_args(inputs.base, inputs.data, run), r"checkpoints of an unfinished run \(up to checkpoint-2\)"


def _embeddings_corrupt(inputs):
    bad = inputs.tmp / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return ["medaug", "embed", inputs.data, "--import_file", bad, "--output", inputs.tmp / "e.safetensors"], str(bad)


def _embeddings_strings(inputs):
    names = pd.read_csv(inputs.data / "metadata.csv").file_name
    table = inputs.tmp / "words.parquet"
    pd.DataFrame({"file_name": names, "embedding": [["a", "b"]] * len(names)}).to_parquet(table)
    args = ["medaug", "embed", inputs.data, "--import_file", table, "--output", inputs.tmp / "e.safetensors"]
    return args, f"{table}: .* is not numbers"


def _bench_unknown_provenance(inputs):
    synthetic = inputs.copy(inputs.data, "syn")  # real rows passed off as synthetic: no manifest
    table = pd.read_csv(synthetic / "metadata.csv").assign(split="train")
    table.to_csv(synthetic / "metadata.csv", index=False)
    return (["medaug", "bench", "seg", "--data", inputs.data, "--synthetic", synthetic, "--output_dir",
             inputs.tmp / "bench", "--steps", "1", "--seeds", "1"], "have unknown provenance")


def _output_is_file(command):
    def build(inputs):
        target = inputs.a_file()
        args = {"finetune": lambda: finetune_args(inputs.base, inputs.data, target),
                "train_controlnet": lambda: ["train_controlnet", "--lora_dir", inputs.run, "--train_data_dir",
                                             inputs.data, "--edge_method", "canny", "--output_dir", target],
                "train_vae": lambda: ["train_vae", "--pretrained_model_name_or_path", inputs.base,
                                      "--train_data_dir", inputs.data, "--output_dir", target],
                "generate": lambda: generate_args(inputs.run, inputs.data, target),
                "bench": lambda: ["medaug", "bench", "seg", "--data", inputs.data, "--output_dir", target]}[command]
        return args(), f"--output_dir: {target} exists and is not a folder"
    return build


def _output_under_a_file(command):
    def build(inputs):
        target = inputs.a_file() / "out"
        args = {"finetune": lambda: finetune_args(inputs.base, inputs.data, target),
                "generate": lambda: generate_args(inputs.run, inputs.data, target)}[command]
        return args(), f"--output_dir: {target} cannot be created"
    return build


CASES = {
    **{f"{command} --output_dir is a file": _output_is_file(command)
       for command in ("finetune", "train_controlnet", "train_vae", "generate", "bench")},
    **{f"{command} --output_dir under a file": _output_under_a_file(command) for command in ("finetune", "generate")},
    "generate from a run folder missing its LoRA": _run_missing_weights,
    "generate from a full run folder missing unet/": _run_full_without_unet,
    "generate from a truncated LoRA": _run_truncated_weights,
    "generate from pickle LoRA weights": _run_pickle_weights,
    "generate from a malformed run record": _run_record_malformed,
    "finetune from a base with pickle weights only": _base_pickle_only,
    "finetune resumed from a truncated checkpoint": _checkpoint_truncated,
    "finetune into a finished run": _finished_run,
    "finetune into an unfinished run": _unfinished_run,
    "embed a corrupt safetensors file": _embeddings_corrupt,
    "embed a parquet file of strings": _embeddings_strings,
    "bench synthetic rows of unknown provenance": _bench_unknown_provenance,
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_one_error_line_with_exit_status_2(case, tmp_path, tiny_model_dir, phantom_dir,
                                                            model_folder, checkpointed_run, capsys):  # noqa: F811
    inputs = Inputs(tmp_path, tiny_model_dir, phantom_dir, model_folder("text"), checkpointed_run)
    argv, expected = CASES[case](inputs)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    code, stderr = run_command(argv, capsys)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    assert re.search(expected, stderr), stderr
    after = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert {path: after.get(path) for path in before} == before  # nothing the user had was changed or removed
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_training_refuses_an_unwritable_output_folder_before_its_first_step(tiny_model_dir, phantom_dir, tmp_path,
                                                                           capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (it makes a folder unwritable even for root)")
    try:
        code, stderr = run_command(finetune_args(tiny_model_dir, phantom_dir, locked / "run"), capsys)
        code_here, stderr_here = run_command(finetune_args(tiny_model_dir, phantom_dir, locked), capsys)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert code == 2 and f"--output_dir: {locked / 'run'} cannot be created" in stderr
    assert code_here == 2 and f"--output_dir: {locked} is not writable" in stderr_here
    assert not (tmp_path / "cache").exists()


def test_overwrite_replaces_a_finished_run_and_its_checkpoints(checkpointed_run, tiny_model_dir, phantom_dir,
                                                               tmp_path, capsys):
    import json

    run = shutil.copytree(checkpointed_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    code, stderr = run_command(finetune_args(tiny_model_dir, phantom_dir, run, "--max_train_steps", "1",
                                             "--overwrite"), capsys)
    assert code == 0, stderr
    assert not list(run.glob("checkpoint-*"))  # the old run's checkpoints went with it
    assert json.loads((run / RECORD_NAME).read_text())["steps"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # what training did not write is kept
    assert not (run / LOCK_NAME).exists()


def test_a_second_writer_is_refused_with_the_holder_named(model_folder, phantom_dir, tmp_path,  # noqa: F811
                                                          capsys):
    output_dir = tmp_path / "out"
    with output_lock(output_dir):
        code, stderr = run_command(generate_args(model_folder("text"), phantom_dir, output_dir), capsys)
        assert (output_dir / LOCK_NAME).is_file()
    assert code == 2
    assert f"--output_dir: {output_dir} is in use by another run (pid {os.getpid()} on " in stderr
    assert not output_dir.exists()  # the lock went with its holder, and the folder it made for itself too
    with output_lock(output_dir / "deeper"), pytest.raises(OutputFolderError, match="in use by another run"):
        with output_lock(output_dir / "deeper"):
            pass


def test_a_killed_writer_leaves_no_lock_behind(tmp_path):
    output_dir = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom medaug.outputs import output_lock\n"
         f"with output_lock({str(output_dir)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputFolderError, match=rf"in use by another run \(pid {holder.pid} on "):
            with output_lock(output_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (output_dir / LOCK_NAME).is_file()  # left by the killed process, but no longer held
    with output_lock(output_dir):
        (output_dir / "written").write_text("by the next run")
    assert sorted(path.name for path in output_dir.iterdir()) == ["written"]


def test_inspect_names_a_decompression_bomb_instead_of_decoding_it(phantom_dir, tmp_path, capsys):
    from tests.test_loading import _png_header_only

    data = shutil.copytree(phantom_dir, tmp_path / "data")
    name = pd.read_csv(data / "metadata.csv").file_name[0]
    _png_header_only(data / name, 15000, 15000)
    code, stderr = run_command(["medaug", "inspect", data], capsys)
    assert code == 1  # problems found, as for any unreadable image
    assert f"row 1, column 'file_name', {name}: 15000 x 15000 = 225,000,000 pixels, more than the limit" in stderr
