"""`MedaugPipeline`: generate from a medaug output folder with its own condition (text, reference image or
precomputed embedding).

    pipe = MedaugPipeline.from_medaug("outputs/busi-embedding").to("cuda")
    images = pipe(embeddings=path_foundation_vectors, num_inference_steps=30, guidance_scale=3.0).images

The condition becomes `prompt_embeds` through the run's condition kind, its unconditional embedding becomes
`negative_prompt_embeds` (the empty prompt for text; the learned one otherwise), and the denoising loop is stock
`StableDiffusionPipeline`'s, run on the same modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from medaug.conditioning import CONDITION_KINDS, ClipImageCondition, TextCondition

from .inputs import embedding_batch, image_list, shape_text

# Arguments of the stock pipelines that medaug's pipelines set themselves.
RESERVED = ("prompt_embeds", "negative_prompt_embeds", "image", "ip_adapter_image", "ip_adapter_image_embeds")


class MedaugPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->image_encoder->condition_encoder->unet->vae"
    _optional_components = ["condition_encoder", "image_encoder", "feature_extractor"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, condition_encoder=None, image_encoder=None,
                 feature_extractor=None, conditioning: str = "text", resolution: int | None = None):
        super().__init__()
        if conditioning not in CONDITION_KINDS:
            raise ValueError(f"conditioning: unknown kind '{conditioning}'; expected one of "
                             f"{', '.join(CONDITION_KINDS)}")
        if conditioning != "text" and condition_encoder is None:
            raise ValueError(f"condition_encoder: a {conditioning} model needs its ConditionProjection")
        if conditioning == "clip_image" and (image_encoder is None or feature_extractor is None):
            raise ValueError("image_encoder, feature_extractor: a clip_image model needs both")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              condition_encoder=condition_encoder, image_encoder=image_encoder,
                              feature_extractor=feature_extractor)
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.register_to_config(conditioning=conditioning,
                                resolution=int(resolution or unet.config.sample_size * vae_scale))

    @classmethod
    def from_medaug(cls, model_dir: str | Path, scheduler=None, fuse_lora: bool = True) -> MedaugPipeline:
        """Load a medaug output folder. `scheduler`: None (the base's), a name of medaug.finetuned.SCHEDULERS
        ("ddim", "dpm++", "unipc", ...) or a diffusers scheduler; `fuse_lora` merges the LoRA into the weights."""
        from medaug.finetuned import load_components

        components, run = load_components(model_dir, scheduler, fuse_lora)
        components.pop("controlnet")  # a ControlNet run still generates without its ControlNet here
        return cls(**components, conditioning=run["conditioning"], resolution=run.get("resolution"))

    # ---- conditions ----------------------------------------------------------------------------------

    def encode_condition(self, prompt=None, reference_image=None, embeddings=None,
                         negative_prompt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, negative_prompt_embeds) of shape (B, tokens, cross_attention_dim) for the model's
        condition kind; the negative is the condition's unconditional embedding unless `negative_prompt` (text
        models only) is given."""
        kind = self.config.conditioning
        given = {"prompt": prompt, "reference_image": reference_image, "embeddings": embeddings}
        wanted = {"text": "prompt", "clip_image": "reference_image", "embedding": "embeddings"}[kind]
        for name, value in given.items():
            if name != wanted and value is not None:
                raise ValueError(f"{name}: this model is conditioned on {kind}; pass {self._expected()} instead")
        if given[wanted] is None:
            raise ValueError(f"{wanted}: this model is conditioned on {kind}; pass {self._expected()}")
        if negative_prompt is not None and kind != "text":
            raise ValueError(f"negative_prompt: only text models take one; a {kind} model's negative is its "
                             "learned unconditional embedding")
        with torch.no_grad():
            if kind == "text":
                return self._encode_text(prompt, negative_prompt)
            if kind == "clip_image":
                condition = ClipImageCondition(self.image_encoder, self.feature_extractor, self.condition_encoder)
                features = condition.image_features(image_list(reference_image, "reference_image"))
            else:
                features = embedding_batch(embeddings, self.condition_encoder.feature_shape)
            hidden = self.condition_encoder(features.to(self._execution_device))
            return hidden, self.condition_encoder.unconditional_embedding(hidden.shape[0]).to(hidden.dtype)

    def _expected(self) -> str:
        kind = self.config.conditioning
        if kind == "text":
            return "prompt (a string or a list of strings)"
        if kind == "clip_image":
            return "reference_image (a PIL image, path or (H, W[, 3]) array, or a list of them)"
        shape = tuple(self.condition_encoder.feature_shape)
        return f"embeddings of shape {shape_text(shape)} or {shape_text(('B',) + shape)}"

    def _encode_text(self, prompt, negative_prompt) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(text, str) for text in prompts):
            raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        condition = TextCondition(self.tokenizer, self.text_encoder)
        hidden = condition.features(prompts)
        if negative_prompt is None:
            return hidden, condition.unconditional_embedding(len(prompts)).to(hidden.dtype)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
        return hidden, condition.features(negatives)

    # ---- sampling -------------------------------------------------------------------------------------

    def stock_pipeline(self):
        """diffusers' StableDiffusionPipeline on this pipeline's modules (shared, not copied)."""
        from diffusers import StableDiffusionPipeline

        stock = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                        unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
        stock.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return stock

    @torch.no_grad()
    def __call__(self, prompt=None, reference_image=None, embeddings=None, negative_prompt=None,
                 num_inference_steps: int = 30, guidance_scale: float = 3.0, generator=None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil",
                 num_images_per_prompt: int = 1, **kwargs):
        """Generate from the model's condition: `prompt` (text models), `reference_image` (clip_image) or
        `embeddings` (embedding). Height and width default to the run's resolution; other keyword arguments
        (eta, latents, callback_on_step_end, ...) go to stock StableDiffusionPipeline."""
        _refuse_reserved(kwargs)
        prompt_embeds, negative = self.encode_condition(prompt, reference_image, embeddings, negative_prompt)
        return self.stock_pipeline()(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, height=height or self.config.resolution,
            width=width or self.config.resolution, output_type=output_type,
            num_images_per_prompt=num_images_per_prompt, **kwargs)


def _refuse_reserved(kwargs: dict) -> None:
    reserved = sorted(set(kwargs) & set(RESERVED))
    if reserved:
        raise ValueError(f"{', '.join(reserved)}: set by the pipeline from prompt, reference_image, embeddings "
                         "and control_image; pass those instead")
