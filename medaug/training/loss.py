"""The denoising loss of one training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(predict, noise_scheduler, latents, hidden_states, generator, noise_offset: float = 0.0,
                   snr_gamma: float | None = None, extra_loss=None) -> torch.Tensor:
    """The loss of `predict(noisy_latents, timesteps, hidden_states)` (the UNet, or the UNet with a ControlNet's
    residuals) on fresh noise and timesteps drawn from `generator`; Min-SNR weighted when `snr_gamma` is given;
    plus `extra_loss(noisy, timesteps, prediction)` where given (the mask-consistency loss)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                            generator=generator).to(latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = predict(noisy, timesteps, hidden_states)
    extra = extra_loss(noisy, timesteps, prediction) if extra_loss is not None else 0.0
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float()) + extra
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean() + extra
