"""What the GAN and the autoencoder share: a decoder from a vector to an image that can also read a class or a mask,
a strided convolutional encoder, and the generation interface `MedaugGeneratorPipeline` calls.

A generator's condition (`--condition`) is one of:
- `none`: the image depends on the drawn vector alone;
- `class`: a learned embedding of the row's `label` joins the vector (class-conditional samples for `bench cls`);
- `mask`: the mask, resized, joins the input of every decoder block, so the image is drawn for that mask and
  carries it as its segmentation label.

Only group norm is used (no batch norm): it keeps no running statistics, so a checkpoint's trainable parameters
are the whole state and each image depends on its own vector only, not on the batch it was drawn in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONDITIONS = ("none", "class", "mask")


def check_condition(condition: str, class_names) -> None:
    if condition not in CONDITIONS:
        raise ValueError(f"--condition: unknown '{condition}'; expected one of {', '.join(CONDITIONS)}")
    if condition == "class" and len(class_names) < 2:
        raise ValueError(f"--condition class: column 'label' must hold two or more classes, got {list(class_names)}")


def parse_channels(text) -> list[int]:
    """--generator_channels as integers ("256,128,64", or a list from a config file)."""
    try:
        return [int(part) for part in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise ValueError(f"--generator_channels: expected integers separated by commas, got {text!r}") from None


def check_resolution(resolution: int, channels) -> int:
    """The decoder's first square's side; the resolution must halve len(channels) times down to at least 2."""
    multiple = 2 ** len(channels)
    if resolution % multiple or resolution // multiple < 2:
        raise ValueError(f"--resolution {resolution}: must be a multiple of {multiple} (at least {2 * multiple}) "
                         f"for --generator_channels {list(channels)}")
    return resolution // multiple


def group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, width), width)


def resized_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) masks in {0, 1} as lesion shares of a size x size grid, centred on 0."""
    return F.interpolate(masks, size=(size, size), mode="area") * 2.0 - 1.0


class ConditionalDecoder(nn.Module):
    """(vector, class embedding or None, mask or None) -> image in [-1, 1]: a linear layer to a small square, then
    doubling blocks (nearest upsampling, 3x3 convolution, group norm, ReLU) and a 3x3 convolution to the image."""

    def __init__(self, vector_dim: int, out_channels: int, resolution: int, channels, class_dim: int = 0,
                 reads_mask: bool = False):
        super().__init__()
        self.start = check_resolution(resolution, channels)
        self.reads_mask = reads_mask
        extra = int(reads_mask)
        self.project = nn.Linear(vector_dim + class_dim, channels[0] * self.start ** 2)
        widths = [channels[0], *channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(wide + extra, narrow, 3, padding=1), group_norm(narrow), nn.ReLU())
            for wide, narrow in zip(widths[:-1], widths[1:]))
        self.to_image = nn.Conv2d(channels[-1] + extra, out_channels, 3, padding=1)

    def _with_mask(self, hidden: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        if not self.reads_mask:
            return hidden
        return torch.cat([hidden, resized_mask(masks, hidden.shape[-1])], dim=1)

    def forward(self, vectors: torch.Tensor, class_embedding: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> torch.Tensor:
        inputs = vectors if class_embedding is None else torch.cat([vectors, class_embedding], dim=1)
        hidden = F.relu(self.project(inputs)).reshape(len(vectors), -1, self.start, self.start)
        for block in self.blocks:
            hidden = block(self._with_mask(F.interpolate(hidden, scale_factor=2, mode="nearest"), masks))
        return torch.tanh(self.to_image(self._with_mask(hidden, masks)))


class ConvEncoder(nn.Module):
    """(image, mask or None) -> a flat feature vector: 4x4 stride-2 convolutions (group norm after the first),
    leaky ReLU, mirror image of `ConditionalDecoder`'s blocks."""

    def __init__(self, in_channels: int, resolution: int, channels, reads_mask: bool = False):
        super().__init__()
        start = check_resolution(resolution, channels)
        self.reads_mask = reads_mask
        widths = [in_channels + int(reads_mask), *reversed(channels)]
        layers: list[nn.Module] = []
        for number, (narrow, wide) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Conv2d(narrow, wide, 4, 2, 1), *([group_norm(wide)] if number else []), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels[0] * start ** 2

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        inputs = torch.cat([images, masks * 2.0 - 1.0], dim=1) if self.reads_mask else images
        return self.net(inputs).flatten(1)


def per_image(generator, batch: int, draw) -> torch.Tensor:
    """`draw(count, torch_generator)` for a batch: one draw per image from its own generator when given a list
    (medaug generate seeds each image), else one draw for the whole batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: {len(generator)} generators for {batch} images")
        return torch.cat([draw(1, one) for one in generator])
    return draw(batch, generator)


class ImageGeneratorMixin:
    """The generation interface of a generator family (`MedaugGeneratorPipeline` calls only this):
    `draw_vectors(batch, generator)` then `decode(vectors, masks, class_indices)`; `condition` and `class_names`
    say what `decode` needs besides the vectors."""

    @property
    def condition(self) -> str:
        return self.config.condition

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def class_indices(self, labels) -> torch.Tensor:
        """Indices of `labels` (names or integers) among the generator's classes; an unknown one is refused."""
        names = self.class_names
        indices = []
        for label in labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"class_labels: '{label}' is not a class of this generator ({', '.join(names)})")
                indices.append(names.index(label))
            elif 0 <= int(label) < len(names):
                indices.append(int(label))
            else:
                raise ValueError(f"class_labels: {label} is outside 0..{len(names) - 1}")
        return torch.tensor(indices, dtype=torch.long)

    def check_inputs(self, masks, class_indices) -> None:
        """Refuse a missing condition, and one the generator would ignore (an image that does not show a mask or
        class given for it must not be stored with it)."""
        for name, given, needed in (("mask_image", masks, "mask"), ("class_labels", class_indices, "class")):
            if given is not None and self.condition != needed:
                raise ValueError(f"{name}: this {self.family} does not read it (--condition {self.condition})")
        if self.condition == "mask" and masks is None:
            raise ValueError(f"mask_image: this {self.family} draws an image for a mask (--condition mask)")
        if self.condition == "class" and class_indices is None:
            raise ValueError(f"class_labels: this {self.family} draws images of a class (--condition class: "
                             f"{', '.join(self.class_names)})")
