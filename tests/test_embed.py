"""`medaug embed`: computing embeddings with a local vision model and importing precomputed ones."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from medaug.cli import app
from medaug.embeddings import EmbeddingError, load_embeddings

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, ["embed", *map(str, args)])
    return result, " ".join(result.output.split())


def file_names(folder):
    return list(pd.read_csv(folder / "metadata.csv", dtype=str)["file_name"])


def test_compute_vectors_and_token_matrices_with_the_base_image_encoder(tiny_model_dir, phantom_dir, tmp_path):
    encoder = tiny_model_dir / "image_encoder"
    result, _ = invoke(phantom_dir, "--model_path", encoder, "--output", tmp_path / "v.safetensors")
    assert result.exit_code == 0, result.output
    vectors = load_file(str(tmp_path / "v.safetensors"))
    assert sorted(vectors) == sorted(file_names(phantom_dir))
    assert {value.shape for value in vectors.values()} == {(32,)}
    first, second = file_names(phantom_dir)[:2]
    assert not np.allclose(vectors[first], vectors[second])  # the image matters
    result, _ = invoke(phantom_dir, "--model_path", tiny_model_dir / "image_encoder", "--tokens", "--split", "test",
                       "--output", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    tokens = load_file(str(tmp_path / "t.safetensors"))
    assert len(tokens) == 4 and {value.shape for value in tokens.values()} == {(65, 32)}  # 8x8 patches + class


def test_import_elixr_parquet_with_flat_values_and_another_key(phantom_dir, tmp_path):
    names = file_names(phantom_dir)
    rng = np.random.default_rng(0)
    values = {name: rng.normal(size=32 * 768).astype(np.float32) for name in names}
    pd.DataFrame({"image_id": names, "elixr": [values[n].tolist() for n in names]}).to_parquet(tmp_path / "e.parquet")
    result, output = invoke(phantom_dir, "--import_file", tmp_path / "e.parquet", "--key_column", "image_id",
                            "--value_column", "elixr", "--shape", "32,768", "--output", tmp_path / "e.safetensors")
    assert result.exit_code == 0, output
    imported = load_embeddings(tmp_path / "e.safetensors")
    assert imported[names[3]].shape == (32, 768)
    np.testing.assert_array_equal(imported[names[3]].ravel(), values[names[3]])


def test_import_path_foundation_npz_matched_on_a_metadata_column(phantom_dir, tmp_path):
    table = pd.read_csv(phantom_dir / "metadata.csv", dtype=str)
    data = tmp_path / "data"
    data.mkdir()
    for name in table["file_name"]:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes((phantom_dir / name).read_bytes())
    table["slide_id"] = [f"slide-{i}" for i in range(len(table))]
    table.drop(columns="mask_file_name").to_csv(data / "metadata.csv", index=False)
    embeddings = np.random.default_rng(1).normal(size=(len(table), 384)).astype(np.float32)
    np.savez(tmp_path / "pickled.npz", file_name=np.array(table["slide_id"], dtype=object), embeddings=embeddings)
    result, output = invoke(data, "--import_file", tmp_path / "pickled.npz", "--output", tmp_path / "pf.safetensors")
    assert result.exit_code == 2 and "pickled Python objects, which medaug does not load" in output
    np.savez(tmp_path / "pf.npz", file_name=np.array(table["slide_id"], dtype=str), embeddings=embeddings)
    result, output = invoke(data, "--import_file", tmp_path / "pf.npz", "--match_column", "slide_id",
                            "--output", tmp_path / "pf.safetensors")
    assert result.exit_code == 0, output
    np.testing.assert_array_equal(load_embeddings(tmp_path / "pf.safetensors")[table["file_name"][5]], embeddings[5])


def test_bad_imports_are_named(phantom_dir, tmp_path):
    names = file_names(phantom_dir)
    table = pd.DataFrame({"file_name": names[1:], "embedding": [[0.0] * 4] * (len(names) - 1)})
    table.to_parquet(tmp_path / "a.parquet")
    result, output = invoke(phantom_dir, "--import_file", tmp_path / "a.parquet",
                            "--output", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and f"no embedding for 1 row(s): {names[0]}" in output
    result, output = invoke(phantom_dir, "--import_file", tmp_path / "a.parquet", "--key_column", "id",
                            "--output", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "column 'id' not found" in output
    result, output = invoke(phantom_dir, "--output", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "exactly one of --model_path" in output
    result, output = invoke(phantom_dir, "--model_path", tmp_path, "--output", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "not a Hugging Face model folder" in output
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(EmbeddingError, match="cannot be shaped"):
        load_embeddings(tmp_path / "a.parquet", shape=(3,))


def test_parquet_without_pyarrow_names_the_extra(phantom_dir, tmp_path, monkeypatch):
    names = file_names(phantom_dir)
    pd.DataFrame({"file_name": names, "embedding": [[0.0] * 4] * len(names)}).to_parquet(tmp_path / "a.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed: importing it fails
    result, output = invoke(phantom_dir, "--import_file", tmp_path / "a.parquet",
                            "--output", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "pip install 'medaug[parquet]'" in output and "a.parquet" in output
    assert not (tmp_path / "o.safetensors").exists()


def test_a_malformed_shape_is_named(phantom_dir, tmp_path):
    names = file_names(phantom_dir)
    pd.DataFrame({"file_name": names, "embedding": [[0.0] * 4] * len(names)}).to_parquet(tmp_path / "a.parquet")
    result, output = invoke(phantom_dir, "--import_file", tmp_path / "a.parquet", "--shape", "2,x",
                            "--output", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "shape '2,x': expected sizes separated by commas" in output
