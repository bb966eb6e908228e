"""`MedaugControlNetPipeline`: generate from a train_controlnet.py output folder, following an edge map.

    pipe = MedaugControlNetPipeline.from_medaug("outputs/busi-controlnet").to("cuda")
    image = pipe(prompt="breast ultrasound, benign lesion", control_image=edges).images[0]

`control_image` is the edge map the generated anatomy follows: 3 equal channels (or one, repeated) in [0, 1] at
the output size, as `medaug.edges.row_control_image` makes them for training. Conditions work as in
`MedaugPipeline`; the denoising loop is stock `StableDiffusionControlNetPipeline`'s on the same modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .inputs import control_batch
from .medaug_pipeline import MedaugPipeline, _refuse_reserved


class MedaugControlNetPipeline(MedaugPipeline):
    model_cpu_offload_seq = "text_encoder->image_encoder->condition_encoder->unet->vae"
    _optional_components = ["condition_encoder", "image_encoder", "feature_extractor"]

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, condition_encoder=None,
                 image_encoder=None, feature_extractor=None, conditioning: str = "text",
                 resolution: int | None = None, edge_method: str | None = None):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, condition_encoder, image_encoder,
                         feature_extractor, conditioning, resolution)
        if controlnet is None:
            raise ValueError("controlnet: MedaugControlNetPipeline needs a ControlNetModel")
        self.register_modules(controlnet=controlnet)
        self.register_to_config(edge_method=edge_method)

    @classmethod
    def from_medaug(cls, model_dir: str | Path, scheduler=None, fuse_lora: bool = True) -> MedaugControlNetPipeline:
        """Load a train_controlnet.py output folder (it must hold controlnet/); see MedaugPipeline.from_medaug."""
        from medaug.finetuned import load_components

        if not (Path(model_dir) / "controlnet" / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no controlnet/ in this output folder; train one with "
                                    "train_scripts/train_controlnet.py, or load it with MedaugPipeline")
        components, run = load_components(model_dir, scheduler, fuse_lora)
        return cls(**components, conditioning=run["conditioning"], resolution=run.get("resolution"),
                   edge_method=run.get("edge_method"))

    def stock_pipeline(self):
        """diffusers' StableDiffusionControlNetPipeline on this pipeline's modules (shared, not copied)."""
        from diffusers import StableDiffusionControlNetPipeline

        stock = StableDiffusionControlNetPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            controlnet=self.controlnet, scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        stock.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return stock

    @torch.no_grad()
    def __call__(self, prompt=None, reference_image=None, embeddings=None, control_image=None,
                 negative_prompt=None, num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 controlnet_conditioning_scale: float = 1.0, generator=None, height: int | None = None,
                 width: int | None = None, output_type: str = "pil", num_images_per_prompt: int = 1, **kwargs):
        """Generate following `control_image` (one edge map for every condition, or one per condition), from
        the model's condition as MedaugPipeline does. Other keyword arguments (guess_mode,
        control_guidance_start, eta, ...) go to stock StableDiffusionControlNetPipeline."""
        _refuse_reserved(kwargs)
        if control_image is None:
            raise ValueError("control_image: a ControlNet model needs an edge map, (H, W) or (H, W, 3) in [0, 1] "
                             "at the output size (a PIL image, array or tensor, or a list of them)")
        height, width = height or self.config.resolution, width or self.config.resolution
        control = control_batch(control_image, height, width)
        prompt_embeds, negative = self.encode_condition(prompt, reference_image, embeddings, negative_prompt)
        if control.shape[0] not in (1, prompt_embeds.shape[0]):
            raise ValueError(f"control_image: {control.shape[0]} edge maps for {prompt_embeds.shape[0]} conditions; "
                             "give one for all, or one per condition")
        return self.stock_pipeline()(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, image=control,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale, generator=generator, height=height,
            width=width, output_type=output_type, num_images_per_prompt=num_images_per_prompt, **kwargs)
