"""`MedaugPix2PixPipeline`: images from masks with a train_pix2pix.py run folder, one generator pass each.

    pipe = MedaugPix2PixPipeline.from_medaug("outputs/busi-pix2pix")
    image = pipe(mask_image=mask, generator=torch.Generator().manual_seed(0)).images[0]

It takes the same call as medaug's diffusion pipelines where that makes sense (`mask_image`, `generator`, `height`,
`width`, `output_type`); a condition, step count and guidance scale mean nothing to pix2pix and are accepted only
so that `medaug generate` can call every generator alike. The seed draws the generator's noise channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from .medaug_mask_pipeline import mask_batch

IGNORED = ("condition", "prompt", "num_inference_steps", "guidance_scale")


class MedaugPix2PixPipeline(DiffusionPipeline):
    def __init__(self, pix2pix, resolution: int = 64):
        super().__init__()
        self.register_modules(pix2pix=pix2pix)
        self.register_to_config(resolution=int(resolution))

    @classmethod
    def from_medaug(cls, model_dir: str | Path, base_model=None, **_) -> MedaugPix2PixPipeline:
        from medaug.models.pix2pix import Pix2PixGenerator
        from medaug.run_loader import check_run_files
        from medaug.run_record import read_run_record

        record = read_run_record(model_dir)
        if record.generator != "pix2pix":
            raise ValueError(f"{model_dir}: a {record.generator} run, not pix2pix; load it with MedaugPipeline")
        check_run_files(Path(model_dir), record)
        generator = Pix2PixGenerator.from_pretrained(Path(model_dir) / "pix2pix", use_safetensors=True)
        return cls(generator, record.resolution)

    @torch.no_grad()
    def __call__(self, mask_image=None, generator=None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil", **kwargs):
        unknown = sorted(set(kwargs) - set(IGNORED))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an argument of MedaugPix2PixPipeline")
        if mask_image is None:
            raise ValueError("mask_image: pix2pix draws an image for a mask, (H, W) at the output size")
        height, width = height or self.config.resolution, width or self.config.resolution
        multiple = self.pix2pix.multiple
        if height % multiple or width % multiple:
            raise ValueError(f"height, width: must be multiples of {multiple} for this generator, got {height}x{width}")
        masks = mask_batch(mask_image, height, width).to(self.device)
        noise = randn_tensor((masks.shape[0], self.pix2pix.config.noise_channels, height, width), generator=generator,
                             device=self.device)
        images = ((self.pix2pix.eval()(masks, noise) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)  # RGB like the diffusion pipelines; generate stores grey as grey
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
