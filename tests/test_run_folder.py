"""The run folder has one owner: its record (versions, a moved base, a model card), one loader that refuses an
incomplete folder, pipelines that save and reload, and a fourth condition kind added in this file alone."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from medaug.conditioning import CONDITION_KINDS, Condition, ConditionProjection
from medaug.generate import generate
from medaug.pipelines import MedaugControlNetPipeline, MedaugPipeline
from medaug.run_record import RECORD_NAME, RunRecordError, read_run_record
from medaug.scripts import finetune
from tests.model_folders import EMBEDDING_SHAPE

pytest_plugins = ["tests.model_folders"]  # the session's model_folder fixture

FAST = {"num_inference_steps": 2}


def train(base, data, output_dir, *flags, steps=2):
    arguments = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir",
                 str(output_dir), "--latent_cache_dir", str(output_dir.parent / "cache"), "--max_train_steps", str(steps),
                 "--train_batch_size", "2", "--max_train_samples", "4", "--report_to", "none", "--seed", "0",
                 "--learning_rate", "1e-3", *map(str, flags)]
    finetune.main(finetune.parse_args(arguments))
    return output_dir


# ---- a fourth condition kind, defined here and nowhere else ------------------------------------------------


class HashedLabelCondition(Condition):
    """A row's class label as a fixed pseudo-random vector (its hash), through a trainable projection."""

    kind = "hashed_label"
    argument = "labels"
    settings = {"label_column": "label", "condition_tokens": 2}
    WIDTH = 8

    def __init__(self, projection, settings):
        self.projection = projection
        self.column = self.settings_from(settings)["label_column"]

    @classmethod
    def build(cls, base, cross_attention_dim, tokenizer, text_encoder, settings):
        return cls(ConditionProjection.for_features((cls.WIDTH,), cross_attention_dim, settings["condition_tokens"]),
                   settings)

    @classmethod
    def from_components(cls, components, settings):
        return cls(components.get("condition_encoder"), settings)

    def inputs(self, folder, rows):
        labels = [folder.value(i, self.column) for i in rows]
        if not all(labels):
            raise ValueError(f"column '{self.column}' is empty in some rows")
        return labels

    def features(self, labels):
        digests = [np.frombuffer(hashlib.sha256(label.encode()).digest()[:self.WIDTH], dtype=np.uint8)
                   for label in labels]
        return torch.from_numpy(np.stack(digests).astype(np.float32) / 255.0)

    def value_features(self, labels):
        return self.features([labels] if isinstance(labels, str) else list(labels))

    def value_bytes(self, value):
        return value.encode()


def test_a_fourth_kind_trains_generates_and_samples_from_this_file_alone(tiny_model_dir, phantom_dir, tmp_path,
                                                                          monkeypatch, one_torch_thread):
    monkeypatch.setitem(CONDITION_KINDS, "hashed_label", HashedLabelCondition)
    run = train(tiny_model_dir, phantom_dir, tmp_path / "run", "--conditioning", "hashed_label", steps=3)
    record = read_run_record(run)
    assert record.conditioning == "hashed_label"
    assert record.condition_settings == {"label_column": "label", "condition_tokens": 4}  # the flag's default
    summary = generate(run, tmp_path / "synthetic", from_masks=phantom_dir, max_sources=2, **FAST)
    assert summary["written"] == 2
    manifest = [json.loads(line) for line in (tmp_path / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert all(len(entry["condition_hash"]) == 16 for entry in manifest)  # from value_bytes, the label's
    pipe = MedaugPipeline.from_medaug(run)
    images = pipe(condition=["round", "irregular"], generator=[torch.Generator().manual_seed(0)] * 2,
                  output_type="np", **FAST).images
    assert images.shape == (2, 64, 64, 3) and np.abs(images[0] - images[1]).max() > 1e-4
    with pytest.raises(ValueError, match="prompt: this model is conditioned on hashed_label; pass labels"):
        pipe(prompt="round", **FAST)


# ---- the record ---------------------------------------------------------------------------------------------


def test_record_holds_what_generation_needs_and_a_model_card(model_folder, tiny_model_dir):
    run = model_folder("embedding")
    record = read_run_record(run)
    assert record.version == 2 and record.script == "finetune" and record.unet_train_mode == "lora"
    assert record.channels == 1  # the phantom's images are grey: decided when training, stored in the record
    assert record.resolution == 64 and record.steps == 2 and record.base_model == str(tiny_model_dir.resolve())
    assert record.condition_settings["embedding_shape"] is None and record.embeddings_file.endswith(".safetensors")
    card = (run / "README.md").read_text()
    assert "library_name: diffusers" in card and str(tiny_model_dir.resolve()) in card
    assert "MedaugPipeline.from_medaug" in card and "load_lora_weights" in card


def test_version_1_records_are_read_and_newer_ones_refused(model_folder, tmp_path, tiny_model_dir):
    run = shutil.copytree(model_folder("text"), tmp_path / "old")
    raw = json.loads((run / RECORD_NAME).read_text())
    legacy = {"base_model": str(tiny_model_dir), "resolution": 64, "conditioning": "text", "caption_column": "label",
              "train_mode": "lora", "rank": 4, "fit": "pad", "train_data_dir": raw["train_data_dir"],
              "split": "train", "max_train_steps": 2, "seed": 0}  # vars(args) and extras, as before versions
    (run / RECORD_NAME).write_text(json.dumps(legacy))
    record = read_run_record(run)
    assert record.condition_settings == {"caption_column": "label"} and record.unet_train_mode == "lora"
    assert record.channels == 1  # read once from the training data, which version 1 did not record
    (run / RECORD_NAME).write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(RunRecordError, match="record version 99 is newer than this medaug reads"):
        read_run_record(run)
    (run / RECORD_NAME).write_text("{not json")
    with pytest.raises(RunRecordError, match="not readable JSON"):
        read_run_record(run)


def test_a_moved_base_is_found_beside_the_run_or_named_with_base_model(tiny_model_dir, phantom_dir, tmp_path):
    beside = tmp_path / "project"
    shutil.copytree(tiny_model_dir, beside / "base")
    train(beside / "base", phantom_dir, beside / "run")
    shutil.move(beside, tmp_path / "moved")  # base and run move together: the relative path still holds
    assert generate(tmp_path / "moved" / "run", tmp_path / "a", prompt="phantom", **FAST)["written"] == 1

    elsewhere = shutil.copytree(tiny_model_dir, tmp_path / "base-before")
    run = train(elsewhere, phantom_dir, tmp_path / "runs" / "run")
    shutil.move(elsewhere, tmp_path / "base-after")
    with pytest.raises(RunRecordError, match="base-before is not there .*pass --base_model"):
        generate(run, tmp_path / "b", prompt="phantom", **FAST)
    assert not (tmp_path / "b").exists()
    summary = generate(run, tmp_path / "b", prompt="phantom", base_model=tmp_path / "base-after", **FAST)
    assert summary["written"] == 1


def test_an_incomplete_run_folder_is_refused_before_anything_is_written(model_folder, tmp_path):
    run = shutil.copytree(model_folder("text"), tmp_path / "run")
    (run / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(RunRecordError, match="pytorch_lora_weights.safetensors is missing"):
        generate(run, tmp_path / "synthetic", prompt="phantom", **FAST)
    assert not (tmp_path / "synthetic").exists()
    with pytest.raises(RunRecordError, match="incomplete"):
        MedaugPipeline.from_medaug(run)


# ---- pipelines ------------------------------------------------------------------------------------------------


def sample(pipe, **kwargs):
    return pipe(output_type="np", generator=torch.Generator().manual_seed(0), **FAST, **kwargs).images


def test_pipelines_save_and_reload_with_their_own_from_pretrained(model_folder, tmp_path, one_torch_thread):
    embeddings = np.random.default_rng(0).normal(size=(1, *EMBEDDING_SHAPE)).astype(np.float32)
    pipe = MedaugPipeline.from_medaug(model_folder("embedding"))
    pipe.save_pretrained(tmp_path / "embedding")
    reloaded = MedaugPipeline.from_pretrained(tmp_path / "embedding")
    assert reloaded.config.conditioning == "embedding" and reloaded.config.resolution == 64
    np.testing.assert_allclose(sample(reloaded, embeddings=embeddings), sample(pipe, embeddings=embeddings),
                               atol=1e-5)
    edges = np.zeros((64, 64), dtype=np.float32)
    edges[16:48, 20] = 1.0
    controlled = MedaugControlNetPipeline.from_medaug(model_folder("text", controlnet=True))
    controlled.save_pretrained(tmp_path / "controlnet")
    again = MedaugControlNetPipeline.from_pretrained(tmp_path / "controlnet")
    assert again.config.edge_method == "mask_boundary"
    np.testing.assert_allclose(sample(again, prompt="phantom", control_image=edges),
                               sample(controlled, prompt="phantom", control_image=edges), atol=1e-5)
