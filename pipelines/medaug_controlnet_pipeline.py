"""`MedaugControlNetPipeline`: generate from a train_controlnet.py run folder, following an edge map.

    pipe = MedaugControlNetPipeline.from_medaug("outputs/busi-controlnet").to("cuda")
    image = pipe(prompt="breast ultrasound, benign lesion", control_image=edges).images[0]

`control_image` is the edge map the generated anatomy follows: 3 equal channels (or one, repeated) in [0, 1] at
the output size, as `medaug.edges.row_control_image` makes them for training. Conditions work as in
`MedaugPipeline`; it is diffusers' `StableDiffusionControlNetPipeline` with a condition encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionControlNetPipeline

from medaug.conditioning import condition_class

from .inputs import control_batch
from .medaug_pipeline import MedaugConditionMixin, refuse_reserved


class MedaugControlNetPipeline(MedaugConditionMixin, StableDiffusionControlNetPipeline):
    model_cpu_offload_seq = "text_encoder->image_encoder->condition_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "condition_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, condition_encoder=None,
                 requires_safety_checker: bool = False, conditioning: str = "text", resolution: int | None = None,
                 edge_method: str | None = None):
        if controlnet is None:
            raise ValueError("controlnet: MedaugControlNetPipeline needs a ControlNetModel")
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
                         scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_modules(condition_encoder=condition_encoder)
        self.register_to_config(conditioning=condition_class(conditioning).kind,
                                resolution=int(resolution or unet.config.sample_size * self.vae_scale_factor),
                                edge_method=edge_method)
        self._check_condition_modules()

    @classmethod
    def from_medaug(cls, model_dir: str | Path, scheduler=None, fuse_lora: bool = True,
                    base_model: str | Path | None = None) -> MedaugControlNetPipeline:
        """Load a train_controlnet.py run folder (it must hold controlnet/); see MedaugPipeline.from_medaug."""
        from medaug.run_loader import apply_lora, load_run_components

        if not (Path(model_dir) / "controlnet" / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no controlnet/ in this output folder; train one with "
                                    "train_controlnet.py, or load it with MedaugPipeline")
        components, record = load_run_components(model_dir, scheduler, base_model)
        pipeline = cls(**components, conditioning=record.conditioning, resolution=record.resolution,
                       edge_method=record.edge_method)
        apply_lora(pipeline, model_dir, fuse_lora)
        return pipeline

    @torch.no_grad()
    def __call__(self, prompt=None, reference_image=None, embeddings=None, condition=None, control_image=None,
                 negative_prompt=None, num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 controlnet_conditioning_scale: float = 1.0, generator=None, height: int | None = None,
                 width: int | None = None, output_type: str = "pil", num_images_per_prompt: int = 1, **kwargs):
        """Generate following `control_image` (one edge map for every condition, or one per condition), from
        the model's condition as MedaugPipeline does. Other keyword arguments (guess_mode,
        control_guidance_start, eta, ...) go to stock StableDiffusionControlNetPipeline."""
        refuse_reserved(kwargs)
        if control_image is None:
            raise ValueError("control_image: a ControlNet model needs an edge map, (H, W) or (H, W, 3) in [0, 1] "
                             "at the output size (a PIL image, array or tensor, or a list of them)")
        height, width = height or self.config.resolution, width or self.config.resolution
        control = control_batch(control_image, height, width)
        prompt_embeds, negative = self.encode_condition(prompt, reference_image, embeddings, condition,
                                                        negative_prompt)
        if control.shape[0] not in (1, prompt_embeds.shape[0]):
            raise ValueError(f"control_image: {control.shape[0]} edge maps for {prompt_embeds.shape[0]} conditions; "
                             "give one for all, or one per condition")
        return super().__call__(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, image=control,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale, generator=generator, height=height,
            width=width, output_type=output_type, num_images_per_prompt=num_images_per_prompt, **kwargs)
