"""A convolutional variational autoencoder that generates images: trained to reconstruct the training images through
a Gaussian latent vector held near N(0, I) by a KL term, it draws new images by decoding vectors drawn from N(0, I).

Conditioned (`condition` class or mask, see `medaug.models.generators`), both halves read the condition: the
encoder so the latent vector need not hold it, the decoder so that a drawn vector becomes an image of that class or
for that mask. A diffusers `ModelMixin`, so it saves and loads like the UNet.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from medaug.models.generators import ConditionalDecoder, ConvEncoder, ImageGeneratorMixin, check_condition, per_image


class ConvVAE(ImageGeneratorMixin, ModelMixin, ConfigMixin):
    """(image, condition) -> (reconstruction, mean, log-variance); `decode(vectors, masks, class_indices)` draws."""

    family = "autoencoder"

    @register_to_config
    def __init__(self, image_channels: int = 1, resolution: int = 64, channels: tuple[int, ...] = (256, 128, 64, 32),
                 latent_dim: int = 64, condition: str = "none", class_names: tuple[str, ...] = (),
                 class_dim: int = 16):
        super().__init__()
        check_condition(condition, class_names)
        reads_mask = condition == "mask"
        self.class_embedding = nn.Embedding(len(class_names), class_dim) if condition == "class" else None
        used_class_dim = class_dim if condition == "class" else 0
        self.encoder = ConvEncoder(image_channels, resolution, channels, reads_mask)
        self.to_mean = nn.Linear(self.encoder.feature_dim + used_class_dim, latent_dim)
        self.to_log_variance = nn.Linear(self.encoder.feature_dim + used_class_dim, latent_dim)
        self.decoder = ConditionalDecoder(latent_dim, image_channels, resolution, channels, used_class_dim, reads_mask)

    def _embedding(self, class_indices: torch.Tensor | None) -> torch.Tensor | None:
        if self.class_embedding is None:
            return None
        return self.class_embedding(class_indices.to(self.class_embedding.weight.device))

    def encode(self, images, masks=None, class_indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(images, masks)
        embedding = self._embedding(class_indices)
        if embedding is not None:
            features = torch.cat([features, embedding], dim=1)
        return self.to_mean(features), self.to_log_variance(features).clamp(-20.0, 10.0)

    def decode(self, vectors, masks=None, class_indices=None) -> torch.Tensor:
        self.check_inputs(masks, class_indices)
        return self.decoder(vectors, self._embedding(class_indices), masks)

    def draw_vectors(self, batch: int, generator=None) -> torch.Tensor:
        """Latent vectors from the prior N(0, I), on the model's device."""
        size = self.config.latent_dim
        vectors = per_image(generator, batch, lambda count, one: torch.randn((count, size), generator=one))
        return vectors.to(self.device)

    def forward(self, images, masks=None, class_indices=None, noise: torch.Tensor | None = None):
        """Reconstruction through a vector drawn from the posterior with `noise` (N(0, I) of shape (B, latent_dim))."""
        mean, log_variance = self.encode(images, masks, class_indices)
        noise = torch.randn_like(mean) if noise is None else noise.to(mean.device)
        vectors = mean + torch.exp(0.5 * log_variance) * noise
        return self.decode(vectors, masks, class_indices), mean, log_variance


def vae_loss(reconstruction, images, mean, log_variance, kl_weight: float) -> dict[str, torch.Tensor]:
    """Squared error summed over each image plus `kl_weight` x KL(posterior || N(0, I)) summed over the latent
    dimensions, averaged over the batch and divided by the pixel values per image (so the learning rate does not
    depend on the resolution). `kl_weight` is twice the variance of a Gaussian decoder on the [-1, 1] scale."""
    values_per_image = images[0].numel()
    squared = (reconstruction - images).pow(2).flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp())).sum(1).mean()
    loss = (squared + kl_weight * kl) / values_per_image
    return {"loss": loss, "mse": squared / values_per_image, "kl": kl}
