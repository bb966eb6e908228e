"""From-scratch base models: stock diffusers loads them offline, the tokenizer keeps domain words whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medaug.models import PRESETS, init_model
from medaug.models.tokenizer import build_vocabulary, learn_merges


def test_stock_pipeline_loads_and_runs_the_tiny_model(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert pipeline.vae_scale_factor == 2
    assert pipeline.image_encoder is not None and pipeline.feature_extractor is not None
    assert pipeline.tokenizer.model_max_length == 77
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size == 32
    assert pipeline.scheduler.config.steps_offset == 1 and pipeline.scheduler.config.clip_sample is False

    def generate(seed):
        return pipeline("breast ultrasound, benign lesion", num_inference_steps=2, height=64, width=64,
                        output_type="np", generator=torch.Generator().manual_seed(seed)).images

    first = generate(0)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, generate(0))
    assert not np.array_equal(first, generate(1))


def test_image_encoder_embeds_to_the_cross_attention_width(tiny_model_dir):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_model_dir / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(tiny_model_dir / "feature_extractor")
    pixels = processor(images=np.zeros((100, 90, 3), dtype=np.uint8), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 64, 64)
    assert encoder(pixel_values=pixels).image_embeds.shape == (1, 32)


def test_tokenizer_keeps_imaging_words_and_prompt_words_whole(tiny_model_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    tokens = tokenizer.tokenize("Breast ultrasound, BENIGN lesion; pneumothorax")
    assert tokens == ["breast</w>", "ultrasound</w>", ",</w>", "benign</w>", "lesion</w>", ";</w>",
                      "pneumothorax</w>"]
    unknown = tokenizer.tokenize("zyxwv")
    assert len(unknown) > 1 and all(token in tokenizer.get_vocab() for token in unknown)


def test_bpe_merges_make_every_training_word_one_token():
    words = ["lesion", "lesions", "less", "mass", "masses", "a"]
    vocab, merges = build_vocabulary(words)
    assert merges == learn_merges(words)  # deterministic
    for word in words:
        assert word + "</w>" in vocab
    assert len(set(vocab.values())) == len(vocab)


def test_init_model_records_parameter_counts_and_refuses_a_used_folder(tmp_path):
    description = init_model(tmp_path / "m", preset="tiny")
    saved = json.loads((tmp_path / "m" / "medaug_model.json").read_text())
    assert saved == description and saved["pretrained"] is False
    assert set(saved["parameters"]) == {"vae", "unet", "text_encoder", "image_encoder"}
    assert 500_000 < saved["parameters"]["unet"] < 2_000_000
    with pytest.raises(FileExistsError, match="not empty"):
        init_model(tmp_path / "m", preset="tiny")
    init_model(tmp_path / "m", preset="tiny", seed=1, overwrite=True)
    assert json.loads((tmp_path / "m" / "medaug_model.json").read_text())["seed"] == 1


def test_small_preset_sizes():
    from medaug.models.init_model import build_unet, build_vae, count_parameters

    small = PRESETS["small"]
    assert small.vae_scale == 4 and small.resolution == 128
    unet = build_unet(small)
    vae = build_vae(small)
    latents = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32)
    assert unet(latents, 10, encoder_hidden_states=torch.zeros(1, 5, small.text_hidden)).sample.shape == latents.shape
    assert 10_000_000 < count_parameters(unet) < 30_000_000
