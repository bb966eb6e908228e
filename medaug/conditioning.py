"""Condition encoders: every kind of prompt becomes the UNet's `encoder_hidden_states` (batch, tokens, width).

A condition has two halves. The frozen half (`features`) turns what a dataset row holds (`inputs`: a prompt,
a reference image path, an embedding key) into a tensor that never changes during training, so it can be
computed once and cached (`cache_sources` names the model files it depends on). The trainable half
(`ConditionProjection`, a diffusers `ModelMixin`) maps features to hidden states and holds a learned
unconditional embedding for condition dropout and classifier-free guidance. Text needs no projection: its
unconditional embedding is the empty prompt's.

A condition class also owns what generation needs, so training, `medaug generate`, the pipelines and the run
loader never ask which kind they hold:
- `settings`: its options and their defaults (the flags of the same names); the run record keeps them;
- `argument`: the pipeline keyword its values go by (`prompt`, `reference_image`, `embeddings`);
- `row_values(folder, rows)`: the values a dataset's rows give the pipeline; `value_features(values)`: what
  the pipeline does with values a caller passes; `value_text` / `value_bytes`: how a manifest records one;
- `extra_components(base, settings)`: modules a loaded run needs beyond the base's (the CLIP vision encoder);
  `from_components(components, settings)` rebuilds the condition from loaded modules.

Adding a kind is one class here (or anywhere) and one entry in `CONDITION_KINDS`; nothing else changes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from medaug.condition_inputs import embedding_batch, image_list, shape_text


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


class Condition:
    """What every kind shares; the defaults suit kinds whose row inputs are what a caller passes too."""

    kind = ""
    argument = "condition"
    settings: dict = {}
    required_components: tuple[str, ...] = ("condition_encoder",)  # what a loaded run must have for this kind
    required_settings: tuple[str, ...] = ()  # settings with no usable default
    uses_text_encoder = False  # whether LoRA on the text encoder (--train_text_encoder) changes this condition
    projection: ConditionProjection | None = None
    cache_sources: tuple[Path, ...] | None = None

    @classmethod
    def settings_from(cls, values: dict) -> dict:
        """This kind's settings, taken from `values` (parsed flags, a run record) where given."""
        return {name: values[name] if values.get(name) is not None else default
                for name, default in cls.settings.items()}

    @classmethod
    def extra_components(cls, base: str, settings: dict) -> dict:
        return {}

    def row_values(self, folder, rows: list[int]) -> list:
        return self.inputs(folder, rows)

    def input_identity(self, inputs: list) -> list[str]:
        return [str(item) for item in inputs]

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def value_text(self, value) -> str:
        """The prompt a manifest shows for this value ("" for kinds that are not text)."""
        return ""

    def value_bytes(self, value) -> bytes | None:
        """What identifies this value in a manifest's condition hash (None: its text says it all)."""
        return None

    def describe_values(self) -> str:
        return f"{self.argument} (what a {self.kind} model takes)"

    def hidden_states(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        return self.projection.unconditional_embedding(batch)


class TextCondition(Condition):
    """CLIP text encoder hidden states of a prompt; the empty prompt is the unconditional embedding."""

    kind = "text"
    argument = "prompt"
    settings = {"caption_column": "text"}
    required_components = ("tokenizer", "text_encoder")
    uses_text_encoder = True

    def __init__(self, tokenizer, text_encoder, caption_column: str = "text", sources: tuple[Path, ...] = ()):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.caption_column = caption_column
        self.cache_sources = sources

    @classmethod
    def build(cls, base: str, cross_attention_dim: int, tokenizer, text_encoder, settings: dict):
        return cls(tokenizer, text_encoder, settings["caption_column"],
                   (Path(base) / "text_encoder", Path(base) / "tokenizer"))

    @classmethod
    def from_components(cls, components: dict, settings: dict):
        return cls(components.get("tokenizer"), components.get("text_encoder"),
                   cls.settings_from(settings)["caption_column"])

    def inputs(self, folder, rows: list[int]) -> list[str]:
        """Each row's prompt; a missing column or an empty prompt is refused by name."""
        if not folder.has_column(self.caption_column):
            raise ValueError(f"--caption_column: column '{self.caption_column}' not in {folder.metadata_path}")
        texts = [folder.value(i, self.caption_column) for i in rows]
        empty = [i + 1 for i, text in zip(rows, texts) if not text]
        if empty:
            raise ValueError(f"{folder.metadata_path}: column '{self.caption_column}' is empty in {len(empty)} "
                             f"row(s) (rows {', '.join(map(str, empty[:10]))}); fill it, or pass --prompt where "
                             "generating")
        return texts

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def features(self, texts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.token_ids(texts).to(self.text_encoder.device))[0]

    def value_features(self, prompt) -> torch.Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(text, str) for text in prompts):
            raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        return self.features(prompts)

    def hidden_states(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        """The empty prompt's hidden states: encoded once while the text encoder is frozen (training reads it on
        every step for condition dropout), on every call while it trains."""
        if any(parameter.requires_grad for parameter in self.text_encoder.parameters()):
            return self.features([""]).expand(batch, -1, -1)
        if getattr(self, "_unconditional", None) is None:
            with torch.no_grad():
                self._unconditional = self.features([""])
        return self._unconditional.expand(batch, -1, -1)

    def value_text(self, value) -> str:
        return value

    def describe_values(self) -> str:
        return "prompt (a string or a list of strings)"


def _load_image_encoder(base: str, encoder_path: str | None):
    """(CLIP vision encoder, its processor, the files its features depend on): the given one or the base's."""
    from medaug.embeddings import load_vision_model

    if encoder_path is None:
        if Path(base).is_dir() and not (Path(base) / "image_encoder").is_dir():
            raise ValueError(f"--conditioning clip_image: {base} has no image_encoder/ folder; "
                             "pass --image_encoder_name_or_path")
        encoder, processor = load_vision_model(base, subfolder="image_encoder")
        return encoder, processor, (Path(base) / "image_encoder", Path(base) / "feature_extractor")
    encoder, processor = load_vision_model(encoder_path)
    return encoder, processor, (Path(encoder_path),)


class ClipImageCondition(Condition):
    """A reference image through the (frozen) CLIP vision encoder, then a trainable projection."""

    kind = "clip_image"
    argument = "reference_image"
    settings = {"reference_column": "file_name", "image_encoder_name_or_path": None, "condition_tokens": 4}
    required_components = ("image_encoder", "feature_extractor", "condition_encoder")

    def __init__(self, image_encoder, image_processor, projection: ConditionProjection | None,
                 reference_column: str = "file_name", sources: tuple[Path, ...] = ()):
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.projection = projection
        self.reference_column = reference_column
        self.cache_sources = sources

    @classmethod
    def settings_from(cls, values: dict) -> dict:
        settings = super().settings_from(values)
        encoder = settings["image_encoder_name_or_path"]
        if encoder and Path(encoder).expanduser().is_dir():  # a local folder, found from any working directory
            settings["image_encoder_name_or_path"] = str(Path(encoder).expanduser().resolve())
        return settings

    @classmethod
    def build(cls, base: str, cross_attention_dim: int, tokenizer, text_encoder, settings: dict):
        encoder, processor, sources = _load_image_encoder(base, settings["image_encoder_name_or_path"])
        encoder.requires_grad_(False)
        projection = ConditionProjection.for_features((encoder.config.projection_dim,), cross_attention_dim,
                                                      settings["condition_tokens"])
        return cls(encoder, processor, projection, settings["reference_column"], sources)

    @classmethod
    def extra_components(cls, base: str, settings: dict) -> dict:
        encoder, processor, _ = _load_image_encoder(base, cls.settings_from(settings)["image_encoder_name_or_path"])
        return {"image_encoder": encoder, "feature_extractor": processor}

    @classmethod
    def from_components(cls, components: dict, settings: dict):
        return cls(components.get("image_encoder"), components.get("feature_extractor"),
                   components.get("condition_encoder"), cls.settings_from(settings)["reference_column"])

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

        if self.image_encoder is None or self.image_processor is None:
            raise ValueError("image_encoder, feature_extractor: a clip_image model needs both")
        return torch.from_numpy(embed_images(self.image_encoder, self.image_processor, images))

    def value_features(self, reference_image) -> torch.Tensor:
        return self.image_features(image_list(reference_image, "reference_image"))

    def value_bytes(self, value) -> bytes | None:
        return Path(value).read_bytes() if isinstance(value, (str, Path)) else np.asarray(value).tobytes()

    def describe_values(self) -> str:
        return "reference_image (a PIL image, path or (H, W[, 3]) array, or a list of them)"


class EmbeddingCondition(Condition):
    """A precomputed embedding (ELIXR 32x768, Path Foundation 384, any (D,) or (L, D)) and a projection."""

    kind = "embedding"
    argument = "embeddings"
    settings = {"embeddings_file": None, "embedding_key_column": "file_name", "embedding_value_column": "embedding",
                "embedding_shape": None, "condition_tokens": 4}
    required_settings = ("embeddings_file",)
    cache_sources = None  # already precomputed: nothing to cache

    def __init__(self, embeddings: dict[str, np.ndarray] | None, projection: ConditionProjection | None,
                 settings: dict | None = None):
        self._embeddings = embeddings
        self.projection = projection
        self.options = self.settings_from(settings or {})

    @classmethod
    def settings_from(cls, values: dict) -> dict:
        settings = super().settings_from(values)
        if settings["embeddings_file"]:  # a run record must find it from any working directory
            settings["embeddings_file"] = str(Path(settings["embeddings_file"]).expanduser().resolve())
        return settings

    @classmethod
    def build(cls, base: str, cross_attention_dim: int, tokenizer, text_encoder, settings: dict):
        condition = cls(None, None, settings)
        shape = Counter(value.shape for value in condition.embeddings.values()).most_common(1)[0][0]  # odd ones named
        condition.projection = ConditionProjection.for_features(shape, cross_attention_dim, settings["condition_tokens"])
        return condition

    @classmethod
    def from_components(cls, components: dict, settings: dict):
        return cls(None, components.get("condition_encoder"), settings)

    @property
    def embeddings(self) -> dict[str, np.ndarray]:
        """The embeddings file's table, read when first needed (a caller passing arrays never needs it)."""
        if self._embeddings is None:
            self._embeddings = self._read_table()
        return self._embeddings

    def _read_table(self) -> dict[str, np.ndarray]:
        from medaug.embeddings import load_embeddings

        path, shape = self.options["embeddings_file"], self.options["embedding_shape"]
        if not path:
            raise ValueError("--embeddings_file: this model was trained on embeddings but names no file; pass one")
        if not Path(path).is_file():
            raise ValueError(f"--embeddings_file: {path} not found")
        table = load_embeddings(path, self.options["embedding_key_column"], self.options["embedding_value_column"],
                                tuple(shape) if shape else None)
        if not table:
            raise ValueError(f"--embeddings_file: {path} holds no embeddings")
        return table

    def inputs(self, folder, rows: list[int]) -> list[str]:
        """Each row's key, after checking every row has a finite embedding of the projection's shape."""
        from medaug.embeddings import check_embeddings

        keys = [folder.value(i, "file_name") for i in rows]
        check_embeddings(self.embeddings, keys, self.options["embeddings_file"], self.projection.feature_shape)
        return keys

    def row_values(self, folder, rows: list[int]) -> list[np.ndarray]:
        return [self.embeddings[key] for key in self.inputs(folder, rows)]

    def features(self, keys: list[str]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(self.embeddings[key], dtype=np.float32)) for key in keys])

    def value_features(self, embeddings) -> torch.Tensor:
        return embedding_batch(embeddings, self.projection.feature_shape)

    def value_bytes(self, value) -> bytes | None:
        return np.ascontiguousarray(value, dtype=np.float32).tobytes()

    def describe_values(self) -> str:
        shape = tuple(self.projection.feature_shape)
        return f"embeddings of shape {shape_text(shape)} or {shape_text(('B',) + shape)}"


class NoCondition(Condition):
    """No condition at all: one learned embedding stands for every row (an unconditional model, or one steered by
    its mask alone), and generators that take no condition (pix2pix) record this kind."""

    kind = "none"
    argument = "condition"
    settings = {"condition_tokens": 4}

    def __init__(self, projection: ConditionProjection | None):
        self.projection = projection

    @classmethod
    def build(cls, base: str, cross_attention_dim: int, tokenizer, text_encoder, settings: dict):
        return cls(ConditionProjection.for_features((1,), cross_attention_dim, settings["condition_tokens"]))

    @classmethod
    def from_components(cls, components: dict, settings: dict):
        return cls(components.get("condition_encoder"))

    def inputs(self, folder, rows: list[int]) -> list[str]:
        return [""] * len(rows)

    def features(self, inputs: list) -> torch.Tensor:
        return torch.zeros(len(inputs), 1)

    def value_features(self, condition) -> torch.Tensor:
        count = condition if isinstance(condition, int) else len(condition) if isinstance(condition, (list, tuple)) \
            else 1
        return torch.zeros(count, 1)

    def describe_values(self) -> str:
        return "condition=N (how many images) or a list with one entry per image; the entries are not read"


CONDITION_KINDS: dict[str, type[Condition]] = {
    "text": TextCondition,
    "clip_image": ClipImageCondition,
    "embedding": EmbeddingCondition,
    "none": NoCondition,
}


def condition_class(kind: str) -> type[Condition]:
    if kind not in CONDITION_KINDS:
        raise ValueError(f"conditioning: unknown kind '{kind}'; expected one of {', '.join(CONDITION_KINDS)}")
    return CONDITION_KINDS[kind]


def load_projection(model_dir: str | Path) -> ConditionProjection:
    """The trained projection of a run folder (`condition_encoder/`)."""
    path = Path(model_dir) / "condition_encoder"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no condition encoder here (text-conditioned runs have none)")
    return ConditionProjection.from_pretrained(path, use_safetensors=True)
