"""A mask-consistency loss (the idea of ControlNet++, written here from its description): at small noise levels,
the one-step estimate of the clean image must show the conditioning mask to a frozen segmenter.

At timestep t the model's noise estimate gives x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (or, for
v-prediction, x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v). The VAE decodes it, a segmenter trained on real images reads
it, and Dice + cross-entropy against the mask is added to the denoising loss with a weight. Only samples with
t below a threshold count: at high noise the one-step estimate is a blur that no segmenter can read. Gradients
flow through the frozen decoder and segmenter into the denoiser.

Use a different segmenter (another seed) from the one that scores label fidelity afterwards, or the score
measures how well the generator learned to please one network rather than to draw the lesion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskConsistencyLoss:
    def __init__(self, segmenter, vae, noise_scheduler, weight: float = 0.5, max_timestep: int = 400):
        from monai.losses import DiceCELoss

        if not 0 < max_timestep <= noise_scheduler.config.num_train_timesteps:
            raise ValueError(f"--consistency_max_timestep must be in (0, "
                             f"{noise_scheduler.config.num_train_timesteps}], got {max_timestep}")
        self.model = segmenter.model.eval().requires_grad_(False)
        self.resolution = segmenter.info.resolution
        self.channels = segmenter.info.channels
        self.vae = vae
        self.scheduler = noise_scheduler
        self.weight = weight
        self.max_timestep = max_timestep
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def clean_estimate(self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1).to(noisy.dtype)
        if self.scheduler.config.prediction_type == "v_prediction":
            return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
        return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
        """The weighted loss over the batch's samples below the timestep threshold (0 when there are none);
        `masks` are (B, 1, H, W) at the training resolution."""
        chosen = timesteps < self.max_timestep
        if not chosen.any():
            return prediction.sum() * 0.0
        latents = self.clean_estimate(noisy[chosen], timesteps[chosen], prediction[chosen].to(noisy.dtype))
        decoded = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
        images = ((decoded.clamp(-1, 1) + 1) / 2)
        images = images.mean(dim=1, keepdim=True) if self.channels == 1 else images
        target = masks[chosen].float()
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False)
            target = F.interpolate(target, size=(self.resolution, self.resolution), mode="nearest")
        return self.weight * self.loss(self.model(images), target)
