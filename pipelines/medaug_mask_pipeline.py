"""`MedaugMaskPipeline`: generate from a run whose UNet reads the mask as extra input channels
(`finetune.py --mask_channels`), so the image is made for the mask it comes with.

    pipe = MedaugMaskPipeline.from_medaug("outputs/busi-mask").to("cuda")
    image = pipe(prompt="breast ultrasound, benign lesion", mask_image=mask).images[0]   # mask: (H, W), any non-zero

The mask, reduced to the latent grid by area averaging (the fraction of each latent cell the lesion covers), is
concatenated to the noisy latents at every step, in the guided and the unguided branch alike; only the condition
(prompt, reference image, embedding) is dropped for classifier-free guidance. The loop is diffusers' usual one:
`scheduler.scale_model_input`, the UNet, guidance, `scheduler.step`, then the VAE decodes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from medaug.conditioning import condition_class
from medaug.training.mask_channels import latent_masks

from .medaug_pipeline import MedaugConditionMixin, refuse_reserved


def mask_batch(mask_image, height: int, width: int) -> torch.Tensor:
    """(B, 1, height, width) float in {0, 1} from one mask or a list ((H, W) arrays, tensors or PIL images; any
    non-zero value is the lesion)."""
    masks = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]
    if isinstance(mask_image, (np.ndarray, torch.Tensor)) and np.ndim(mask_image) == 3:
        masks = list(mask_image)
    arrays = []
    for mask in masks:
        array = np.asarray(mask.convert("L") if hasattr(mask, "convert") else
                           mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask)
        array = array[:, :, 0] if array.ndim == 3 else array
        if array.shape != (height, width):
            raise ValueError(f"mask_image: size {array.shape[1]}x{array.shape[0]} differs from the output size "
                             f"{width}x{height} (width x height)")
        arrays.append(array > 0)
    if not arrays:
        raise ValueError("mask_image: the list is empty")
    return torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32))


class MedaugMaskPipeline(MedaugConditionMixin, DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->image_encoder->condition_encoder->unet->vae"
    _optional_components = ["feature_extractor", "image_encoder", "condition_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, feature_extractor=None, image_encoder=None,
                 condition_encoder=None, conditioning: str = "text", resolution: int | None = None):
        super().__init__()
        extra = unet.config.in_channels - vae.config.latent_channels
        if extra < 1:
            raise ValueError(f"unet: in_channels {unet.config.in_channels} leaves no channel for the mask (the VAE's "
                             f"latents have {vae.config.latent_channels}); use MedaugPipeline for this model")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              feature_extractor=feature_extractor, image_encoder=image_encoder,
                              condition_encoder=condition_encoder)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(conditioning=condition_class(conditioning).kind,
                                resolution=int(resolution or unet.config.sample_size * self.vae_scale_factor))
        self._check_condition_modules()

    @classmethod
    def from_medaug(cls, model_dir: str | Path, scheduler=None, fuse_lora: bool = True,
                    base_model: str | Path | None = None) -> MedaugMaskPipeline:
        """Load a `finetune.py --mask_channels` run folder; see MedaugPipeline.from_medaug."""
        from medaug.run_loader import load_run_components

        components, record = load_run_components(model_dir, scheduler, base_model)
        if not record.unet_mask_channels:
            raise ValueError(f"{model_dir}: its UNet takes no mask channels (train with finetune.py "
                             "--mask_channels); load it with MedaugPipeline or MedaugControlNetPipeline")
        for name in ("controlnet",):
            components.pop(name)
        return cls(**components, conditioning=record.conditioning, resolution=record.resolution)

    @torch.no_grad()
    def sample(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, masks: torch.Tensor,
               num_inference_steps: int = 30, guidance_scale: float = 3.0, generator=None, height: int | None = None,
               width: int | None = None, output_type: str = "pil"):
        """Images for condition embeddings (B, tokens, dim) and masks (B or 1, 1, H, W) in {0, 1}."""
        height, width = height or self.config.resolution, width or self.config.resolution
        device = self._execution_device
        batch = prompt_embeds.shape[0]
        if masks.shape[0] not in (1, batch):
            raise ValueError(f"mask_image: {masks.shape[0]} masks for {batch} conditions; give one for all, or one "
                             "per condition")
        latent_size = height // self.vae_scale_factor
        mask_latents = latent_masks(masks, latent_size).to(device, self.unet.dtype).expand(batch, -1, -1, -1)
        guided = guidance_scale > 1.0
        hidden = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
        hidden = hidden.to(device, self.unet.dtype)
        shape = (batch, self.vae.config.latent_channels, latent_size, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_options = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            mask_input = torch.cat([mask_latents] * 2) if guided else mask_latents
            noise = self.unet(torch.cat([model_input, mask_input], dim=1), t, encoder_hidden_states=hidden).sample
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, t, latents, **step_options).prev_sample
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    @torch.no_grad()
    def __call__(self, prompt=None, reference_image=None, embeddings=None, condition=None, mask_image=None,
                 negative_prompt=None, num_inference_steps: int = 30, guidance_scale: float = 3.0, generator=None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil", **kwargs):
        """Generate an image for each condition that shows `mask_image` (one mask for all, or one per
        condition, at the output size) as its lesion."""
        refuse_reserved(kwargs)
        if kwargs:
            raise ValueError(f"{', '.join(sorted(kwargs))}: not an argument of MedaugMaskPipeline")
        if mask_image is None:
            raise ValueError("mask_image: a mask-channel model needs the mask to draw, (H, W) at the output size")
        height, width = height or self.config.resolution, width or self.config.resolution
        masks = mask_batch(mask_image, height, width)
        prompt_embeds, negative = self.encode_condition(prompt, reference_image, embeddings, condition,
                                                        negative_prompt)
        return self.sample(prompt_embeds, negative, masks, num_inference_steps, guidance_scale, generator, height,
                           width, output_type)
