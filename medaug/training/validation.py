"""Validation images during training: sample with the model as it is now, save a PNG grid and send the images to
the trackers chosen with --report_to."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("medaug.validation")


def validation_scheduler(base: str, cache_dir: str | None = None):
    """`medaug generate`'s default sampler built from the base's scheduler config, so that validation images are
    sampled as generated ones will be."""
    from diffusers import DDIMScheduler

    from medaug.run_loader import make_scheduler
    from medaug.speed import DEFAULT_SCHEDULER

    return make_scheduler(DEFAULT_SCHEDULER, DDIMScheduler.load_config(base, subfolder="scheduler",
                                                                         cache_dir=cache_dir))


def sample_images(
    vae, unet, scheduler, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
    num_inference_steps: int, guidance_scale: float, resolution: int, seed: int,
    text_encoder=None, tokenizer=None, controlnet=None, control_image: torch.Tensor | None = None,
    controlnet_conditioning_scale: float = 1.0, masks: torch.Tensor | None = None,
) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1] from condition embeddings, with classifier-free guidance; with a
    `controlnet`, following `control_image` ((N, 3, H, W) in [0, 1]); with `masks` ((N, 1, H, W) in {0, 1}), from a
    UNet that reads them as extra input channels."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if masks is not None:
        from medaug.pipelines import MedaugMaskPipeline

        pipeline = MedaugMaskPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, resolution=resolution)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.sample(prompt_embeds, negative_prompt_embeds, masks, num_inference_steps, guidance_scale,
                               generator, resolution, resolution, output_type="np").images
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    control = {}
    if controlnet is None:
        pipeline = StableDiffusionPipeline(**components)
    else:
        pipeline = StableDiffusionControlNetPipeline(controlnet=controlnet, **components)
        control = {"image": control_image, "controlnet_conditioning_scale": controlnet_conditioning_scale}
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        height=resolution, width=resolution, generator=generator, output_type="np", **control,
    ).images


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, C) images into one (rows*H, columns*W, C) array."""
    count, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.zeros((rows * height, columns * width, channels), dtype=images.dtype)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def save_grid(images: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = (np.clip(image_grid(images), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)
    return path


def log_to_trackers(trackers, images: np.ndarray, step: int, tag: str = "validation") -> list[str]:
    """Send (N, H, W, 3) images in [0, 1] to each accelerate tracker: TensorBoard's image panel, wandb's media
    panel, any other tracker through its `log_images`; returns the names of the trackers that got them."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    sent = []
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image((image * 255).round().astype(np.uint8), caption=f"{tag} {index}")
                               for index, image in enumerate(images)]}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: list(images)}, step=step)
        else:
            logger.info("validation images: the %s tracker takes no images", tracker.name)
            continue
        sent.append(tracker.name)
    return sent
