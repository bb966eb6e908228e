"""Condition encoders: every kind of prompt becomes the UNet's `encoder_hidden_states` (batch, tokens, width).

A condition has two halves. The frozen half (`features`) turns a dataset row into a tensor that never
changes during training (CLIP text hidden states, CLIP image embeddings, a precomputed foundation-model
embedding), so it can be computed once and cached. The trainable half (`ConditionProjection`, a diffusers
`ModelMixin`) maps features to hidden states and holds a learned unconditional embedding for condition
dropout and classifier-free guidance. Text needs no projection: its unconditional embedding is the empty
prompt's.

Adding a kind is one class here and one entry in `CONDITION_KINDS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ConditionProjection(ModelMixin, ConfigMixin):
    """Maps condition features of shape (input_tokens, input_dim), or (input_dim,) when input_tokens is 0,
    to (tokens, cross_attention_dim), with a learned unconditional embedding."""

    @register_to_config
    def __init__(self, input_dim: int, cross_attention_dim: int, input_tokens: int = 0, output_tokens: int = 4):
        super().__init__()
        self.tokens = input_tokens if input_tokens > 0 else output_tokens
        width = cross_attention_dim * (1 if input_tokens > 0 else output_tokens)
        self.input_norm = nn.LayerNorm(input_dim)
        self.proj = nn.Linear(input_dim, width)
        self.output_norm = nn.LayerNorm(cross_attention_dim)
        self.unconditional = nn.Parameter(torch.randn(1, self.tokens, cross_attention_dim) * 0.02)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        tokens, width = self.config.input_tokens, self.config.input_dim
        return (tokens, width) if tokens > 0 else (width,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        hidden = self.proj(self.input_norm(features.to(self.proj.weight.dtype)))
        hidden = hidden.reshape(batch, self.tokens, self.config.cross_attention_dim)
        return self.output_norm(hidden)

    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        return self.unconditional.expand(batch, -1, -1)


class TextCondition:
    """CLIP text encoder hidden states of a prompt; the empty prompt is the unconditional embedding."""

    kind = "text"
    column = "text"

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.projection = None

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def features(self, texts: list[str]) -> torch.Tensor:
        device = self.text_encoder.device
        return self.text_encoder(self.token_ids(texts).to(device))[0]

    def hidden_states(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        return self.features([""]).expand(batch, -1, -1)


class ProjectedCondition:
    """Shared behaviour of conditions whose features pass through a trainable projection."""

    projection: ConditionProjection

    def hidden_states(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        return self.projection.unconditional_embedding(batch)


class ClipImageCondition(ProjectedCondition):
    """A reference image through the (frozen) CLIP vision encoder, then a trainable projection."""

    kind = "clip_image"

    def __init__(self, image_encoder, image_processor, projection: ConditionProjection):
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.projection = projection

    @staticmethod
    def new_projection(image_encoder, cross_attention_dim: int, tokens: int = 4) -> ConditionProjection:
        return ConditionProjection(input_dim=image_encoder.config.projection_dim,
                                   cross_attention_dim=cross_attention_dim, output_tokens=tokens)

    def features(self, images: list[np.ndarray]) -> torch.Tensor:
        """CLIP image embeddings of (H, W, 3) float images in [0, 1]."""
        pixels = self.image_processor(images=[np.clip(image, 0, 1) for image in images], do_rescale=False,
                                      return_tensors="pt").pixel_values
        pixels = pixels.to(self.image_encoder.device, self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels).image_embeds


class EmbeddingCondition(ProjectedCondition):
    """A precomputed embedding (ELIXR 32x768, Path Foundation 384, any (D,) or (L, D)) and a projection."""

    kind = "embedding"

    def __init__(self, embeddings: dict[str, np.ndarray], projection: ConditionProjection):
        self.embeddings = embeddings
        self.projection = projection

    @staticmethod
    def new_projection(feature_shape: tuple[int, ...], cross_attention_dim: int, tokens: int = 4):
        input_tokens = feature_shape[0] if len(feature_shape) == 2 else 0
        return ConditionProjection(input_dim=feature_shape[-1], cross_attention_dim=cross_attention_dim,
                                   input_tokens=input_tokens, output_tokens=tokens)

    def features(self, keys: list[str]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(self.embeddings[key], dtype=np.float32)) for key in keys])


CONDITION_KINDS = {
    "text": TextCondition,
    "clip_image": ClipImageCondition,
    "embedding": EmbeddingCondition,
}


def load_projection(model_dir: str | Path) -> ConditionProjection:
    """The trained projection of a finetune.py output folder (`condition_encoder/`)."""
    path = Path(model_dir) / "condition_encoder"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no condition encoder here (text-conditioned runs have none)")
    return ConditionProjection.from_pretrained(path)
