"""`MedaugGeneratorPipeline`: images from a train_gan.py or train_autoencoder.py run folder, one decoder pass each.

    pipe = MedaugGeneratorPipeline.from_medaug("outputs/busi-gan")
    image = pipe(class_labels=["benign"], generator=torch.Generator().manual_seed(0)).images[0]   # --condition class
    image = pipe(mask_image=mask).images[0]                                                       # --condition mask
    images = pipe(num_images=4).images                                                            # --condition none

It takes the same call as `MedaugPix2PixPipeline` (`mask_image`, `generator`, `height`, `width`, `output_type`),
plus `class_labels` (class names or indices) and `num_images`; a condition, step count and guidance scale mean
nothing here and are accepted only so that `medaug generate` can call every generator alike. The seed draws the
latent vector (and a GAN's code); with a list of generators each image's from its own, so an image depends on
its seed only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .medaug_mask_pipeline import mask_batch

IGNORED = ("condition", "prompt", "num_inference_steps", "guidance_scale")
FAMILIES = ("gan", "autoencoder")  # each run keeps its network in the folder of the same name


class MedaugGeneratorPipeline(DiffusionPipeline):
    def __init__(self, image_generator):
        super().__init__()
        self.register_modules(image_generator=image_generator)

    @classmethod
    def from_medaug(cls, model_dir: str | Path, base_model=None, **_) -> MedaugGeneratorPipeline:
        from medaug.models.autoencoder import ConvVAE
        from medaug.models.gan import GanGenerator
        from medaug.run_loader import check_run_files
        from medaug.run_record import read_run_record

        record = read_run_record(model_dir)
        if record.generator not in FAMILIES:
            raise ValueError(f"{model_dir}: a {record.generator} run, not {' or '.join(FAMILIES)}")
        check_run_files(Path(model_dir), record)
        model_class = {"gan": GanGenerator, "autoencoder": ConvVAE}[record.generator]
        return cls(model_class.from_pretrained(Path(model_dir) / record.generator, use_safetensors=True))

    def check_size(self, height: int | None, width: int | None) -> int:
        """The output size, which must be the trained one (the decoder starts from a fixed square)."""
        resolution = self.image_generator.resolution
        if (height or resolution, width or resolution) != (resolution, resolution):
            raise ValueError(f"height, width: this {self.image_generator.family} draws {resolution}x{resolution} "
                             f"images only, got {width}x{height}")
        return resolution

    def _batch_size(self, masks, class_labels, generator, num_images) -> int:
        sizes = {name: size for name, size in (("mask_image", None if masks is None else len(masks)),
                                               ("class_labels", None if class_labels is None else len(class_labels)),
                                               ("generator", len(generator) if isinstance(generator, list) else None),
                                               ("num_images", num_images)) if size is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{', '.join(sizes)}: give as many of each ({sizes})")
        return next(iter(sizes.values()), 1)

    @torch.no_grad()
    def __call__(self, mask_image=None, class_labels=None, num_images: int | None = None, generator=None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil", **kwargs):
        unknown = sorted(set(kwargs) - set(IGNORED))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an argument of MedaugGeneratorPipeline")
        model = self.image_generator.eval()
        resolution = self.check_size(height, width)
        masks = mask_batch(mask_image, resolution, resolution).to(self.device) if mask_image is not None else None
        if isinstance(class_labels, str):
            class_labels = [class_labels]
        classes = model.class_indices(class_labels) if class_labels is not None else None
        batch = self._batch_size(masks, class_labels, generator, num_images)
        model.check_inputs(masks, classes)
        vectors = model.draw_vectors(batch, generator)
        images = ((model.decode(vectors, masks, classes) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)  # RGB like the diffusion pipelines; generate stores grey as grey
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in images]
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
