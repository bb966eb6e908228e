"""medaug generate: synthetic dataset folders from phantom and BUSI masks, images and edge maps; reruns after a
SIGKILL, two launched processes, and bad input refused before any file is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medaug.cli import app
from medaug.data import DatasetFolder, fit_square, load_mask, read_manifest
from medaug.generate import generate, job_seed
from medaug.run_record import read_run_record
from tests.conftest import REPO_ROOT, shared_dataset

pytest_plugins = ["tests.model_folders"]  # the session's model_folder fixture

FAST = {"num_inference_steps": 2}


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def assert_synthetic_folder(output_dir: Path, expected: int, with_masks: bool = True) -> list:
    """The folder is a clean dataset of `expected` images whose metadata and manifest agree."""
    folder = DatasetFolder(output_dir)
    folder.check()  # raises on any missing, unreadable or mismatched file
    entries = read_manifest(output_dir)
    names = [entry.file_name for entry in entries]
    assert len(entries) == expected and len(set(names)) == expected
    table = pd.read_csv(output_dir / "metadata.csv", dtype=str, keep_default_na=False)
    assert sorted(table["file_name"]) == sorted(names) and set(table["split"]) == {"train"}
    images = sorted(str(path.relative_to(output_dir)) for path in (output_dir / "images").iterdir())
    assert images == sorted(names)  # nothing else: no temporary files, no strays
    for entry in entries:
        with Image.open(output_dir / entry.file_name) as image:
            image.load()
            assert image.size == (64, 64)
            assert image.mode == "L"  # every model here learned from grey phantoms or BUSI: stored grey too
        if with_masks:
            assert entry.mask_file_name and (output_dir / entry.mask_file_name).is_file()
            with Image.open(output_dir / entry.mask_file_name) as mask:
                assert mask.size == (64, 64)
    if with_masks:
        assert sorted(table["mask_file_name"]) == sorted(entry.mask_file_name for entry in entries)
        assert sorted(os.listdir(output_dir / "masks")) == sorted(Path(e.mask_file_name).name for e in entries)
    return entries


@pytest.fixture(scope="module")
def reference_run(model_folder, phantom_dir, tmp_path_factory):
    """ControlNet model, phantom masks, 2 images for each of the first 3 training rows, in one process,
    in batches of 2."""
    output_dir = tmp_path_factory.mktemp("generate") / "reference"
    model_dir = model_folder("text", controlnet=True)
    summary = generate(model_dir, output_dir, from_masks=phantom_dir, num_per_source=2, max_sources=3,
                       batch_size=2, **FAST)
    return {"model_dir": model_dir, "output_dir": output_dir, "summary": summary}


def test_from_masks_gives_n_per_source_each_with_its_fitted_mask(reference_run, phantom_dir):
    output_dir, summary = reference_run["output_dir"], reference_run["summary"]
    assert summary["written"] == summary["total"] == 6 and summary["skipped"] == 0
    assert summary["images_per_second"] > 0
    entries = assert_synthetic_folder(output_dir, 6)
    source = DatasetFolder(phantom_dir)
    train_rows = source.indices("train")[:3]
    by_name = {source.value(i, "file_name"): i for i in train_rows}
    assert sorted({entry.source_file_name for entry in entries}) == sorted(by_name)
    for entry in entries:
        row = by_name[entry.source_file_name]
        assert entry.source_split == "train" and entry.source_dataset == str(phantom_dir.resolve())
        assert entry.prompt == source.value(row, "text") and entry.extra["label"] == source.value(row, "label")
        assert entry.seed == job_seed(0, train_rows.index(row), entry.extra["number"])
        assert entry.extra["edge_method"] == "mask_boundary" and len(entry.condition_hash) == 16
        expected = fit_square(load_mask(source.path(row, "mask_file_name")), 64, "pad", nearest=True)
        np.testing.assert_array_equal(load_mask(output_dir / entry.mask_file_name), expected)
    args = json.loads((output_dir / "generate_args.json").read_text())
    assert args["source"] == "from_masks" and args["edge_method"] == "mask_boundary" and args["num_per_source"] == 2
    seeds = [entry.seed for entry in entries]
    assert len(set(seeds)) == 6
    first, second = (np.asarray(Image.open(output_dir / e.file_name)) for e in entries[:2])
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0  # two seeds of one source differ


def test_rerun_skips_resume_grows_and_other_arguments_are_refused(reference_run, phantom_dir, tmp_path):
    output_dir = tmp_path / "synthetic"
    shutil.copytree(reference_run["output_dir"], output_dir)
    model_dir = reference_run["model_dir"]
    options = {"from_masks": phantom_dir, "max_sources": 3, **FAST}
    again = generate(model_dir, output_dir, num_per_source=2, **options)
    assert again["written"] == 0 and again["skipped"] == 6
    before = listing(output_dir)
    with pytest.raises(FileExistsError, match="guidance_scale: was 3.0, now 5.0.*pass --overwrite"):
        generate(model_dir, output_dir, num_per_source=2, guidance_scale=5.0, **options)
    with pytest.raises(FileExistsError, match=r"num_per_source: was 2, now 3.*--resume continues"):
        generate(model_dir, output_dir, num_per_source=3, guidance_scale=5.0, resume=True, **options)
    with pytest.raises(FileExistsError, match="num_per_source: was 2, now 3"):
        generate(model_dir, output_dir, num_per_source=3, **options)
    assert listing(output_dir) == before
    grown = generate(model_dir, output_dir, num_per_source=3, resume=True, **options)
    assert grown["written"] == 3 and grown["skipped"] == 6
    assert_synthetic_folder(output_dir, 9)
    for name in os.listdir(reference_run["output_dir"] / "images"):  # existing images were kept as they were
        assert (output_dir / "images" / name).read_bytes() == (reference_run["output_dir"] / "images" / name
                                                               ).read_bytes()
    fresh = generate(model_dir, output_dir, num_per_source=1, overwrite=True, **options)
    assert fresh["written"] == 3
    assert_synthetic_folder(output_dir, 3)


def test_cli_without_controlnet_uses_rows_for_conditions_and_prints_images_per_second(model_folder, phantom_dir,
                                                                                     tmp_path):
    output_dir = tmp_path / "synthetic"
    result = CliRunner().invoke(app, [
        "generate", "--model_dir", str(model_folder("text")), "--from_images", str(phantom_dir), "--output_dir",
        str(output_dir), "--num_per_source", "2", "--max_sources", "2", "--num_inference_steps", "2",
        "--scheduler", "dpm++", "--batch_size", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output and "images/s" in result.output
    entries = assert_synthetic_folder(output_dir, 4)  # the phantom rows' masks are carried
    assert all(entry.condition_hash == "" and "edge_method" not in entry.extra for entry in entries)
    assert json.loads((output_dir / "generate_args.json").read_text())["scheduler"] == "dpm++"


def test_prompt_alone_and_embedding_rows(model_folder, phantom_dir, tmp_path):
    summary = generate(model_folder("text"), tmp_path / "prompted", prompt="phantom ultrasound", num_per_source=3,
                       **FAST)
    assert summary["written"] == 3
    entries = assert_synthetic_folder(tmp_path / "prompted", 3, with_masks=False)
    assert {entry.prompt for entry in entries} == {"phantom ultrasound"}
    generate(model_folder("embedding"), tmp_path / "embedded", from_masks=phantom_dir, max_sources=2, **FAST)
    entries = assert_synthetic_folder(tmp_path / "embedded", 2)
    assert entries[0].prompt == "" and len({entry.condition_hash for entry in entries}) == 2


def test_edges_from_a_dataset_folder_and_a_plain_folder(model_folder, phantom_dir, tmp_path):
    from medaug.edges import write_edge_dataset

    model_dir = model_folder("text", controlnet=True)
    edge_dataset = write_edge_dataset(phantom_dir, tmp_path / "edges", "mask_boundary", split="train")
    generate(model_dir, tmp_path / "from-dataset", edges=edge_dataset, max_sources=2, **FAST)
    entries = assert_synthetic_folder(tmp_path / "from-dataset", 2)  # the edge dataset's masks are carried
    assert entries[0].extra["edge_method"] == "precomputed"
    plain = tmp_path / "plain"
    plain.mkdir()
    for number in range(2):
        edges = np.zeros((64, 64, 3), dtype=np.uint8)
        edges[10 + 10 * number:40, 20] = 255
        Image.fromarray(edges).save(plain / f"edge_{number}.png")
    generate(model_dir, tmp_path / "from-plain", edges=plain, prompt="phantom ultrasound", **FAST)
    entries = assert_synthetic_folder(tmp_path / "from-plain", 2, with_masks=False)
    assert sorted(entry.source_file_name for entry in entries) == ["edge_0.png", "edge_1.png"]
    assert entries[0].condition_hash != entries[1].condition_hash  # the edge maps are part of the condition


def test_a_train_controlnet_output_folder(model_folder, phantom_dir, tmp_path):
    """The folder the real train_controlnet.py writes (not the test helper's imitation) generates."""
    from medaug.scripts import train_controlnet

    run_dir = tmp_path / "controlnet-run"
    train_controlnet.main(train_controlnet.parse_args([
        "--lora_dir", str(model_folder("text")), "--train_data_dir", str(phantom_dir), "--edge_method", "fused",
        "--max_train_steps", "1", "--train_batch_size", "2", "--max_train_samples", "2", "--report_to", "none",
        "--latent_cache_dir", str(tmp_path / "cache"), "--output_dir", str(run_dir)]))
    summary = generate(run_dir, tmp_path / "synthetic", from_images=phantom_dir, max_sources=2, **FAST)
    assert summary["written"] == 2
    entries = assert_synthetic_folder(tmp_path / "synthetic", 2)
    assert entries[0].extra["edge_method"] == "fused"  # the run's method, from image and mask


def test_real_busi_masks(model_folder, tmp_path):
    busi = shared_dataset("busi")
    output_dir = tmp_path / "synthetic"
    generate(model_folder("text", controlnet=True), output_dir, from_masks=busi, max_sources=2, **FAST)
    entries = assert_synthetic_folder(output_dir, 2)
    source = DatasetFolder(busi)
    for entry, row in zip(sorted(entries, key=lambda e: e.file_name), source.indices("train")[:2]):
        assert entry.source_file_name == source.value(row, "file_name")
        expected = fit_square(load_mask(source.path(row, "mask_file_name")), 64, "pad", nearest=True)
        np.testing.assert_array_equal(load_mask(output_dir / entry.mask_file_name), expected)
        assert expected.any()


def test_a_killed_run_continues_to_exactly_the_expected_files(model_folder, phantom_dir, tmp_path):
    model_dir, output_dir = model_folder("text", controlnet=True), tmp_path / "synthetic"
    options = {"from_masks": phantom_dir, "num_per_source": 3, "num_inference_steps": 4, "batch_size": 1}
    total = 3 * len(DatasetFolder(phantom_dir).indices("train"))
    command = [sys.executable, "-m", "medaug.cli", "generate", "--model_dir", str(model_dir), "--output_dir",
               str(output_dir), *[str(part) for key, value in options.items() for part in (f"--{key}", value)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    manifest, deadline = output_dir / "manifest.jsonl", time.monotonic() + 180
    while not (manifest.is_file() and manifest.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no manifest line within 180 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done = len(read_manifest(output_dir))
    assert 1 <= done < total
    # What a kill can also leave: a half-written image under its temporary name and a torn manifest line.
    (output_dir / "images" / ".00013_002_x.png.partial").write_bytes(b"\x89PNG half")
    with open(manifest, "ab") as handle:
        handle.write(b'{"file_name": "images/000')
    summary = generate(model_dir, output_dir, **options)
    assert summary["skipped"] == done and summary["written"] == total - done
    assert_synthetic_folder(output_dir, total)
    assert not list(output_dir.rglob("*.partial"))


def test_two_launched_processes_split_the_jobs(reference_run, phantom_dir, tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    output_dir = tmp_path / "synthetic"
    # --multi_gpu starts two processes through torchrun; generate's PartialState(cpu=True) joins them in a
    # CPU (gloo) group (accelerate's --cpu flag would start only one).
    command = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medaug.cli", "generate",
               "--model_dir", str(reference_run["model_dir"]), "--from_masks", str(phantom_dir), "--output_dir",
               str(output_dir), "--num_per_source", "2", "--max_sources", "3", "--num_inference_steps", "2",
               "--batch_size", "2"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 process(es)" in result.stdout and result.stdout.count("wrote 6 images") == 1
    entries = assert_synthetic_folder(output_dir, 6)
    # Batches of 2 jobs in order, batch b to process b % 2: batches 0 and 2 to the first, 1 to the second.
    assert sorted(entry.extra["process_index"] for entry in entries) == [0, 0, 0, 0, 1, 1]
    for entry in entries:  # the same batches of seeds give the same images however they were shared out
        ours = np.asarray(Image.open(output_dir / entry.file_name))
        reference = np.asarray(Image.open(reference_run["output_dir"] / entry.file_name))
        # Up to float rounding: other thread counts may move a pixel that sits on a rounding edge by one level.
        difference = np.abs(ours.astype(int) - reference.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01


# ---- bad input: an error naming the flag or file, and nothing written ----


def bad_copy(phantom_dir: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    return data


def test_bad_sources_are_named_and_leave_no_output(model_folder, phantom_dir, tmp_path):
    controlled, output_dir = model_folder("text", controlnet=True), tmp_path / "synthetic"

    def refused(pattern: str, model_dir=controlled, **options):
        with pytest.raises((ValueError, FileNotFoundError, FileExistsError), match=f"(?s){pattern}"):
            generate(model_dir, output_dir, **{**FAST, **options})
        assert not output_dir.exists()

    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(plain / "a.png")
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(plain / "b.png")
    refused(r"--edges: .*b.png: size 64x48 differs from the output size 64x64", edges=plain, prompt="x")
    refused(r"--edges: .* has no controlnet/", model_dir=model_folder("text"), edges=plain, prompt="x")
    refused("--scheduler: unknown scheduler 'fast'; expected one of ddim, ddpm", scheduler="fast",
            from_masks=phantom_dir)
    refused("--prompt: .* is conditioned on embedding, not text", model_dir=model_folder("embedding"),
            from_masks=phantom_dir, prompt="x")
    refused("give one source of structure, not --edges and --from_masks", edges=plain, from_masks=phantom_dir)
    refused("has a ControlNet: give --edges, --from_masks or --from_images")
    data = bad_copy(phantom_dir, tmp_path)
    (data / "masks" / "round_0000.png").unlink()
    refused(r"--from_masks .*row 1, column 'mask_file_name', masks/round_0000.png: file not found", from_masks=data)
    Image.fromarray(np.zeros((40, 80), dtype=np.uint8)).save(data / "masks" / "round_0000.png")
    refused(r"row 1, column 'mask_file_name', masks/round_0000.png: size 80x40 differs", from_masks=data)
    shutil.copyfile(phantom_dir / "masks" / "round_0000.png", data / "masks" / "round_0000.png")
    table = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[1, "mask_file_name"] = ""
    table.loc[3, "text"] = ""
    table.to_csv(data / "metadata.csv", index=False)
    refused(r"--from_masks .*row 2, column 'mask_file_name'.*needs this row's mask_file_name", from_masks=data)
    refused(r"--from_images .*column 'text' is empty in 1 row\(s\) \(rows 4\); fill it, or pass --prompt",
            model_dir=model_folder("text"), from_images=data)


def test_missing_embeddings_and_foreign_output_are_refused(model_folder, phantom_dir, tmp_path):
    from medaug.embeddings import load_embeddings, save_embeddings

    embedding_model = model_folder("embedding")
    table = load_embeddings(read_run_record(embedding_model).embeddings_file)
    del table["images/round_0000.png"]
    partial = save_embeddings(tmp_path / "partial.safetensors", table)
    with pytest.raises(ValueError, match="partial.safetensors: no embedding for 1 row.*images/round_0000.png"):
        generate(embedding_model, tmp_path / "out", from_masks=phantom_dir, embeddings_file=partial, **FAST)
    assert not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["generate", "--model_dir", str(model_folder("text")), "--output_dir",
                                      str(foreign), "--prompt", "x", "--num_inference_steps", "2"])
    assert result.exit_code == 2
    assert "was not written by medaug generate" in " ".join(result.output.split())
    assert listing(foreign) == ["notes.txt"]
