"""A DCGAN-style generator and discriminator, optionally conditioned on a class or a mask
(`medaug.models.generators`), and optionally semi-conditional: InfoGAN-like codes.

Semi-conditional: besides its noise, the generator reads a code with one block of `code_dims` variables per named
distribution (`CODE_DISTRIBUTIONS`). The discriminator has a second head that predicts the code of an image, its
outputs squashed onto each distribution's support (so it places any image, real ones included, somewhere in those
distributions). Trained with an MSE between the drawn code and the head's prediction on the generated image, the
generator learns to express its code in the image, and the head learns to read it back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from medaug.models.generators import ConditionalDecoder, ConvEncoder, ImageGeneratorMixin, check_condition, per_image


def _bernoulli(uniform: torch.Tensor) -> torch.Tensor:
    return (uniform < 0.5).float()


def _exponential(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(-uniform)


def _uniform(uniform: torch.Tensor) -> torch.Tensor:
    return uniform * 2.0 - 1.0


# name: (draw from U(0, 1) samples, the head's squashing onto the support, mean, variance)
CODE_DISTRIBUTIONS = {
    "bernoulli": (_bernoulli, torch.sigmoid, 0.5, 0.25),
    "exponential": (_exponential, F.softplus, 1.0, 1.0),
    "uniform": (_uniform, torch.tanh, 0.0, 1.0 / 3.0),
}


def parse_code_distributions(text: str | list | tuple | None) -> list[str]:
    """'bernoulli,exponential' (or a list) -> the names, each checked; empty for none."""
    if not text:
        return []
    names = [name.strip() for name in text.split(",")] if isinstance(text, str) else [str(name) for name in text]
    unknown = [name for name in names if name not in CODE_DISTRIBUTIONS]
    if unknown or not all(names):
        raise ValueError(f"--code_distributions: unknown distribution(s) {unknown or ['']}; expected names from "
                         f"{', '.join(CODE_DISTRIBUTIONS)}, separated by commas")
    if len(set(names)) != len(names):
        raise ValueError(f"--code_distributions: {','.join(names)} names a distribution twice; raise --code_dims "
                         "for more variables of one distribution")
    return names


def check_code_dims(code_dims: int, distributions: list[str]) -> None:
    if distributions and code_dims < 1:
        raise ValueError(f"--code_dims {code_dims}: must be at least 1 with --code_distributions")


def _per_block(distributions: list[str], code_dims: int, position: int) -> list:
    return [CODE_DISTRIBUTIONS[name][position] for name in distributions]


def draw_codes(distributions: list[str], code_dims: int, batch: int, generator=None) -> torch.Tensor:
    """(batch, len(distributions) x code_dims) codes: one block of `code_dims` independent variables per
    distribution, in the order given."""
    def draw(count: int, one) -> torch.Tensor:
        uniform = torch.rand((count, len(distributions), code_dims), generator=one)
        blocks = [transform(uniform[:, number]) for number, transform in
                  enumerate(_per_block(distributions, code_dims, 0))]
        return torch.cat(blocks, dim=1) if blocks else uniform.reshape(count, 0)

    return per_image(generator, batch, draw)


def squash_codes(raw: torch.Tensor, distributions: list[str], code_dims: int) -> torch.Tensor:
    """The code head's raw outputs mapped onto each distribution's support, block by block."""
    blocks = raw.split(code_dims, dim=1)
    return torch.cat([squash(block) for squash, block in zip(_per_block(distributions, code_dims, 1), blocks)], dim=1)


def code_moments(distributions: list[str], code_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each code variable's mean and variance under its distribution, (len(distributions) x code_dims,) each."""
    means = torch.tensor(_per_block(distributions, code_dims, 2)).repeat_interleave(code_dims)
    variances = torch.tensor(_per_block(distributions, code_dims, 3)).repeat_interleave(code_dims)
    return means, variances


class GanGenerator(ImageGeneratorMixin, ModelMixin, ConfigMixin):
    """(noise, code, condition) -> image in [-1, 1]; `draw_vectors` draws the noise and the code together."""

    family = "gan"

    @register_to_config
    def __init__(self, image_channels: int = 1, resolution: int = 64, channels: tuple[int, ...] = (256, 128, 64, 32),
                 noise_dim: int = 64, condition: str = "none", class_names: tuple[str, ...] = (), class_dim: int = 16,
                 code_distributions: tuple[str, ...] = (), code_dims: int = 0):
        super().__init__()
        check_condition(condition, class_names)
        check_code_dims(code_dims, parse_code_distributions(list(code_distributions)))
        self.class_embedding = nn.Embedding(len(class_names), class_dim) if condition == "class" else None
        self.decoder = ConditionalDecoder(noise_dim + self.code_size, image_channels, resolution, channels,
                                          class_dim if condition == "class" else 0, condition == "mask")

    @property
    def code_size(self) -> int:
        return len(self.config.code_distributions) * self.config.code_dims

    def draw_codes(self, batch: int, generator=None) -> torch.Tensor:
        return draw_codes(list(self.config.code_distributions), self.config.code_dims, batch, generator)

    def draw_vectors(self, batch: int, generator=None) -> torch.Tensor:
        """Noise from N(0, I) and a code from the code distributions, side by side, on the model's device; each
        image's from its own generator when `generator` is a list."""
        noise_dim = self.config.noise_dim

        def draw(count: int, one) -> torch.Tensor:
            return torch.cat([torch.randn((count, noise_dim), generator=one), self.draw_codes(count, one)], dim=1)

        return per_image(generator, batch, draw).to(self.device)

    def decode(self, vectors, masks=None, class_indices=None) -> torch.Tensor:
        self.check_inputs(masks, class_indices)
        embedding = None if self.class_embedding is None else \
            self.class_embedding(class_indices.to(self.class_embedding.weight.device))
        return self.decoder(vectors, embedding, masks)

    def forward(self, vectors, masks=None, class_indices=None) -> torch.Tensor:
        return self.decode(vectors, masks, class_indices)


class GanDiscriminator(ModelMixin, ConfigMixin):
    """(image, condition) -> (real/fake logit, predicted code or None). A class enters as an embedding beside the
    image features (before the real/fake head only), a mask as an input channel."""

    @register_to_config
    def __init__(self, image_channels: int = 1, resolution: int = 64, channels: tuple[int, ...] = (256, 128, 64, 32),
                 condition: str = "none", num_classes: int = 0, class_dim: int = 16,
                 code_distributions: tuple[str, ...] = (), code_dims: int = 0):
        super().__init__()
        self.encoder = ConvEncoder(image_channels, resolution, channels, condition == "mask")
        self.class_embedding = nn.Embedding(num_classes, class_dim) if condition == "class" else None
        used_class_dim = class_dim if condition == "class" else 0
        self.real_head = nn.Linear(self.encoder.feature_dim + used_class_dim, 1)
        code_size = len(code_distributions) * code_dims
        self.code_head = nn.Linear(self.encoder.feature_dim, code_size) if code_size else None

    def forward(self, images, masks=None, class_indices=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.encoder(images, masks)
        judged = features if self.class_embedding is None else \
            torch.cat([features, self.class_embedding(class_indices.to(features.device))], dim=1)
        logits = self.real_head(judged).squeeze(1)
        if self.code_head is None:
            return logits, None
        codes = squash_codes(self.code_head(features), list(self.config.code_distributions), self.config.code_dims)
        return logits, codes
