"""Condition encoders: every kind of prompt becomes the UNet's `encoder_hidden_states` (batch, tokens, width).

A condition has two halves. The frozen half (`features`) turns what a dataset row holds (`inputs`: a prompt,
a reference image path, an embedding key) into a tensor that never changes during training, so it can be
computed once and cached (`cache_sources` names the model files it depends on). The trainable half
(`ConditionProjection`, a diffusers `ModelMixin`) maps features to hidden states and holds a learned
unconditional embedding for condition dropout and classifier-free guidance. Text needs no projection: its
unconditional embedding is the empty prompt's.

Adding a kind is one class here (with `build`, `inputs`, `input_identity`, `features`, `cache_sources`,
`frozen_modules`, `hidden_states`, `unconditional_embedding`) and one entry in `CONDITION_KINDS`; training
scripts do not change.
"""

from __future__ import annotations

from collections import Counter
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

    @classmethod
    def for_features(cls, feature_shape: tuple[int, ...], cross_attention_dim: int, tokens: int = 4):
        """A projection for features of shape (D,) (expanded to `tokens`) or (L, D) (one token each)."""
        input_tokens = feature_shape[0] if len(feature_shape) == 2 else 0
        return cls(input_dim=feature_shape[-1], cross_attention_dim=cross_attention_dim, input_tokens=input_tokens,
                   output_tokens=tokens)

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

    def __init__(self, tokenizer, text_encoder, caption_column: str = "text", sources: tuple[Path, ...] = ()):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.caption_column = caption_column
        self.cache_sources = sources
        self.projection = None

    @classmethod
    def build(cls, base: str, tokenizer, text_encoder, caption_column: str = "text", **_):
        return cls(tokenizer, text_encoder, caption_column, (Path(base) / "text_encoder", Path(base) / "tokenizer"))

    def inputs(self, folder, rows: list[int]) -> list[str]:
        """Each row's prompt; a missing column or an empty prompt is refused by name."""
        if not folder.has_column(self.caption_column):
            raise ValueError(f"--caption_column: column '{self.caption_column}' not in {folder.metadata_path}")
        texts = [folder.value(i, self.caption_column) for i in rows]
        empty = [i + 1 for i, text in zip(rows, texts) if not text]
        if empty:
            raise ValueError(f"{folder.metadata_path}: column '{self.caption_column}' is empty in {len(empty)} "
                             f"row(s) (rows {', '.join(map(str, empty[:10]))}); text conditioning needs a prompt")
        return texts

    def input_identity(self, inputs: list[str]) -> list[str]:
        return list(inputs)

    def frozen_modules(self) -> list[nn.Module]:
        return []  # the text encoder belongs to the base model, which the training script places

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def features(self, texts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.token_ids(texts).to(self.text_encoder.device))[0]

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

    def __init__(self, image_encoder, image_processor, projection: ConditionProjection,
                 reference_column: str = "file_name", sources: tuple[Path, ...] = ()):
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.projection = projection
        self.reference_column = reference_column
        self.cache_sources = sources

    @classmethod
    def build(cls, base: str, cross_attention_dim: int, image_encoder_path: str | None = None,
              reference_column: str | None = None, condition_tokens: int = 4, **_):
        from medaug.embeddings import load_vision_model

        if image_encoder_path is None:
            if Path(base).is_dir() and not (Path(base) / "image_encoder").is_dir():
                raise ValueError(f"--conditioning clip_image: {base} has no image_encoder/ folder; "
                                 "pass --image_encoder_name_or_path")
            encoder, processor = load_vision_model(base, subfolder="image_encoder")
            sources = (Path(base) / "image_encoder", Path(base) / "feature_extractor")
        else:
            encoder, processor = load_vision_model(image_encoder_path)
            sources = (Path(image_encoder_path),)
        encoder.requires_grad_(False)
        projection = ConditionProjection.for_features((encoder.config.projection_dim,), cross_attention_dim,
                                                      condition_tokens)
        return cls(encoder, processor, projection, reference_column or "file_name", sources)

    def inputs(self, folder, rows: list[int]) -> list[Path]:
        if not folder.has_column(self.reference_column):
            raise ValueError(f"--reference_column: column '{self.reference_column}' not in {folder.metadata_path}")
        paths = [folder.path(i, self.reference_column) for i in rows]
        missing = [i + 1 for i, path in zip(rows, paths) if path is None or not path.is_file()]
        if missing:
            raise ValueError(f"{folder.metadata_path}: column '{self.reference_column}' names no existing image "
                             f"in rows {', '.join(map(str, missing[:10]))}")
        return paths

    def frozen_modules(self) -> list[nn.Module]:
        return [self.image_encoder]

    def input_identity(self, inputs: list[Path]) -> list[str]:
        from medaug.training.cache import file_identity

        return [file_identity(path) for path in inputs]

    def features(self, paths: list[Path]) -> torch.Tensor:
        """CLIP image embeddings of the reference images."""
        from medaug.data import load_image

        return self.image_features([load_image(path, channels=3) for path in paths])

    def image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """CLIP image embeddings of (H, W, 3) float images in [0, 1] (what `features` reads from files)."""
        from medaug.embeddings import embed_images

        return torch.from_numpy(embed_images(self.image_encoder, self.image_processor, images))


class EmbeddingCondition(ProjectedCondition):
    """A precomputed embedding (ELIXR 32x768, Path Foundation 384, any (D,) or (L, D)) and a projection."""

    kind = "embedding"
    cache_sources = None  # already precomputed: nothing to cache

    def __init__(self, embeddings: dict[str, np.ndarray], projection: ConditionProjection, source: str = ""):
        self.embeddings = embeddings
        self.projection = projection
        self.source = source

    @classmethod
    def build(cls, cross_attention_dim: int, embeddings_file: str, embedding_key_column: str = "file_name",
              embedding_value_column: str = "embedding", embedding_shape: tuple[int, ...] | None = None,
              condition_tokens: int = 4, **_):
        from medaug.embeddings import load_embeddings

        embeddings = load_embeddings(embeddings_file, embedding_key_column, embedding_value_column, embedding_shape)
        if not embeddings:
            raise ValueError(f"--embeddings_file: {embeddings_file} holds no embeddings")
        shape = Counter(value.shape for value in embeddings.values()).most_common(1)[0][0]  # odd ones get named
        projection = ConditionProjection.for_features(shape, cross_attention_dim, condition_tokens)
        return cls(embeddings, projection, str(embeddings_file))

    def inputs(self, folder, rows: list[int]) -> list[str]:
        """Each row's key, after checking every row has a finite embedding of the projection's shape."""
        from medaug.embeddings import check_embeddings

        keys = [folder.value(i, "file_name") for i in rows]
        check_embeddings(self.embeddings, keys, self.source, self.projection.feature_shape)
        return keys

    def input_identity(self, inputs: list[str]) -> list[str]:
        return list(inputs)

    def frozen_modules(self) -> list[nn.Module]:
        return []

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
