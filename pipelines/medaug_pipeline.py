"""`MedaugPipeline`: generate from a medaug run folder with its own condition (text, reference image, precomputed
embedding, or any kind registered in medaug.conditioning).

    pipe = MedaugPipeline.from_medaug("outputs/busi-embedding").to("cuda")
    images = pipe(embeddings=path_foundation_vectors, num_inference_steps=30, guidance_scale=3.0).images
    pipe.save_pretrained("busi-pipeline"); MedaugPipeline.from_pretrained("busi-pipeline")

It is diffusers' `StableDiffusionPipeline` with a condition encoder: the condition becomes `prompt_embeds` through
the run's condition kind, its unconditional embedding becomes `negative_prompt_embeds` (the empty prompt for text;
the learned one otherwise), and the denoising loop is the stock one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from medaug.conditioning import condition_class

# Arguments of the stock pipelines that medaug's pipelines set themselves.
RESERVED = ("prompt_embeds", "negative_prompt_embeds", "image", "ip_adapter_image", "ip_adapter_image_embeds")
# Names a condition value may be passed by: each kind's own (`Condition.argument`) or the generic `condition`.
CONDITION_ARGUMENTS = ("prompt", "reference_image", "embeddings", "condition")
CONDITION_MODULES = ("tokenizer", "text_encoder", "image_encoder", "feature_extractor", "condition_encoder")


class MedaugConditionMixin:
    """Condition handling shared by medaug's pipelines: the run's condition kind, built from the registered
    modules, turns a caller's values into (prompt_embeds, negative_prompt_embeds)."""

    def _check_condition_modules(self) -> None:
        kind = condition_class(self.config.conditioning)
        missing = [name for name in kind.required_components if getattr(self, name, None) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: a {kind.kind} model needs {'them' if len(missing) > 1 else 'it'}")

    def condition(self):
        """The run's condition object on this pipeline's modules."""
        modules = {name: getattr(self, name, None) for name in CONDITION_MODULES}
        return condition_class(self.config.conditioning).from_components(modules, {})

    def encode_condition(self, prompt=None, reference_image=None, embeddings=None, condition=None,
                         negative_prompt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, negative_prompt_embeds) of shape (B, tokens, cross_attention_dim); the negative is the
        condition's unconditional embedding unless `negative_prompt` (prompt kinds only) is given."""
        encoder = self.condition()
        kind = self.config.conditioning
        given = {name: value for name, value in zip(CONDITION_ARGUMENTS, (prompt, reference_image, embeddings,
                                                                            condition)) if value is not None}
        accepted = {encoder.argument, "condition"}
        for name in given:
            if name not in accepted:
                raise ValueError(f"{name}: this model is conditioned on {kind}; pass {encoder.describe_values()} "
                                 "instead")
        if len(given) != 1:
            raise ValueError(f"{encoder.argument}: this model is conditioned on {kind}; pass "
                             f"{encoder.describe_values()}" + (" (once, not also as condition)" if given else ""))
        if negative_prompt is not None and encoder.argument != "prompt":
            raise ValueError(f"negative_prompt: only text models take one; a {kind} model's negative is its "
                             "learned unconditional embedding")
        with torch.no_grad():
            hidden = encoder.hidden_states(encoder.value_features(next(iter(given.values()))).to(self._execution_device))
            if negative_prompt is None:
                negative = self._unconditional_embedding(encoder)
                return hidden, negative.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
            negatives = [negative_prompt] * hidden.shape[0] if isinstance(negative_prompt, str) else negative_prompt
            if len(negatives) != hidden.shape[0]:
                raise ValueError(f"negative_prompt: {len(negatives)} given for {hidden.shape[0]} prompts")
            return hidden, encoder.hidden_states(encoder.value_features(negatives))


    def _unconditional_embedding(self, encoder) -> torch.Tensor:
        """The condition's unconditional embedding (1, tokens, dim), computed once and kept while the condition
        modules' weights stay the same (fusing or loading a LoRA into them computes it again)."""
        weights = tuple((parameter.data_ptr(), parameter._version) for name in CONDITION_MODULES
                        if isinstance(module := getattr(self, name, None), torch.nn.Module)
                        for parameter in module.parameters())
        cached = getattr(self, "_unconditional_cache", None)
        if cached is None or cached[0] != weights:
            cached = (weights, encoder.unconditional_embedding(1).to(self._execution_device))
            self._unconditional_cache = cached
        return cached[1]


class MedaugPipeline(MedaugConditionMixin, StableDiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->image_encoder->condition_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "condition_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, condition_encoder=None, requires_safety_checker: bool = False,
                 conditioning: str = "text", resolution: int | None = None):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_modules(condition_encoder=condition_encoder)
        self.register_to_config(conditioning=condition_class(conditioning).kind,
                                resolution=int(resolution or unet.config.sample_size * self.vae_scale_factor))
        self._check_condition_modules()

    @classmethod
    def from_medaug(cls, model_dir: str | Path, scheduler=None, fuse_lora: bool = True,
                    base_model: str | Path | None = None) -> MedaugPipeline:
        """Load a medaug run folder. `scheduler`: None (the base's), a name of medaug.run_loader.SCHEDULERS
        ("ddim", "dpm++", "unipc", ...) or a diffusers scheduler; `fuse_lora` merges the LoRA into the weights;
        `base_model` points to the base where the record's path no longer holds it."""
        from medaug.run_loader import apply_lora, load_run_components

        components, record = load_run_components(model_dir, scheduler, base_model)
        components.pop("controlnet")  # a ControlNet run still generates without its ControlNet here
        pipeline = cls(**components, conditioning=record.conditioning, resolution=record.resolution)
        apply_lora(pipeline, model_dir, fuse_lora)
        return pipeline

    @torch.no_grad()
    def __call__(self, prompt=None, reference_image=None, embeddings=None, condition=None, negative_prompt=None,
                 num_inference_steps: int = 30, guidance_scale: float = 3.0, generator=None,
                 height: int | None = None, width: int | None = None, output_type: str = "pil",
                 num_images_per_prompt: int = 1, **kwargs):
        """Generate from the model's condition: `prompt` (text models), `reference_image` (clip_image),
        `embeddings` (embedding), or `condition` for any kind. Height and width default to the run's resolution;
        other keyword arguments (eta, latents, callback_on_step_end, ...) go to stock StableDiffusionPipeline."""
        refuse_reserved(kwargs)
        prompt_embeds, negative = self.encode_condition(prompt, reference_image, embeddings, condition,
                                                        negative_prompt)
        return super().__call__(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, height=height or self.config.resolution,
            width=width or self.config.resolution, output_type=output_type,
            num_images_per_prompt=num_images_per_prompt, **kwargs)


def refuse_reserved(kwargs: dict) -> None:
    reserved = sorted(set(kwargs) & set(RESERVED))
    if reserved:
        raise ValueError(f"{', '.join(reserved)}: set by the pipeline from its condition (prompt, reference_image, "
                         "embeddings or condition) and control_image; pass those instead")
