"""From-scratch Stable Diffusion folders (`medaug init-model`), for machines that cannot reach a model hub.

The folder has the layout of a Hub Stable Diffusion model (`vae/ unet/ text_encoder/ tokenizer/ scheduler/`,
plus `image_encoder/` and `feature_extractor/` for image prompts), so `StableDiffusionPipeline.from_pretrained`
loads it and every medaug script treats it as it would a pretrained base. The weights are random: these
models must be trained (the `train_vae` script, then `finetune --train_mode full`; see medaug.scripts) before use.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from medaug.models.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preset:
    """Sizes of one from-scratch model family."""

    resolution: int  # the pixel size the preset is meant for
    vae_channels: tuple[int, ...]  # one entry per VAE level; n levels downsample by 2**(n-1)
    unet_channels: tuple[int, ...]
    unet_cross_attention: tuple[bool, ...]  # per UNet level, from the highest resolution down
    unet_layers_per_block: int
    unet_attention_heads: int
    text_hidden: int  # also the UNet's cross-attention width
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_patch: int

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


PRESETS: dict[str, Preset] = {
    # Tests: a step takes well under a second on a CPU core at 64 px.
    "tiny": Preset(
        resolution=64, vae_channels=(32, 64), unet_channels=(32, 64), unet_cross_attention=(False, True),
        unet_layers_per_block=1, unet_attention_heads=4, text_hidden=32, text_layers=2, text_heads=4,
        vision_hidden=32, vision_layers=2, vision_heads=4, vision_patch=8,
    ),
    # CPU demos at 128 px and GPU studies at 128-256 px; the VAE downsamples 4x.
    "small": Preset(
        resolution=128, vae_channels=(32, 64, 128), unet_channels=(64, 128, 256),
        unet_cross_attention=(False, True, True), unet_layers_per_block=1, unet_attention_heads=8,
        text_hidden=256, text_layers=4, text_heads=4, vision_hidden=256, vision_layers=4, vision_heads=4,
        vision_patch=16,
    ),
}


def build_vae(preset: Preset):
    from diffusers import AutoencoderKL

    levels = len(preset.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=preset.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, preset.vae_channels[0]),
        sample_size=preset.resolution,
        # Untrained latents have no known spread; train_vae.py measures it and rewrites this value.
        scaling_factor=1.0,
    )


def build_unet(preset: Preset):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in preset.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(preset.unet_cross_attention))
    return UNet2DConditionModel(
        sample_size=preset.resolution // preset.vae_scale,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=preset.unet_channels,
        layers_per_block=preset.unet_layers_per_block,
        cross_attention_dim=preset.text_hidden,
        attention_head_dim=preset.unet_attention_heads,
        norm_num_groups=min(32, preset.unet_channels[0]),
    )


def build_text_encoder(preset: Preset, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_hidden * 4,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=preset.text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_image_encoder(preset: Preset):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_hidden * 4,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.resolution,
        patch_size=preset.vision_patch,
        projection_dim=preset.text_hidden,
    )
    return CLIPVisionModelWithProjection(config)


def build_feature_extractor(preset: Preset):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": preset.resolution},
        crop_size={"height": preset.resolution, "width": preset.resolution},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


MODEL_ENTRIES = (
    "vae", "unet", "text_encoder", "tokenizer", "scheduler", "image_encoder", "feature_extractor",
    "model_index.json", "medaug_model.json",
)


def init_model(
    output_dir: str | Path,
    preset: str = "tiny",
    prompts: list[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write a from-scratch Stable Diffusion folder and return its description (also saved as JSON)."""
    import torch
    from diffusers import StableDiffusionPipeline

    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; expected one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, overwrite)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(output_dir / "tokenizer", prompts or ())
    components = {
        "vae": build_vae(sizes),
        "unet": build_unet(sizes),
        "text_encoder": build_text_encoder(sizes, tokenizer),
        "image_encoder": build_image_encoder(sizes),
    }
    pipeline = StableDiffusionPipeline(
        tokenizer=tokenizer,
        scheduler=build_scheduler(),
        feature_extractor=build_feature_extractor(sizes),
        safety_checker=None,
        requires_safety_checker=False,
        **components,
    )
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    description = {
        "preset": preset,
        "resolution": sizes.resolution,
        "vae_scale_factor": sizes.vae_scale,
        "seed": seed,
        "pretrained": False,
        "vocabulary_size": len(tokenizer),
        "parameters": {name: count_parameters(model) for name, model in components.items()},
        "sizes": asdict(sizes),
    }
    text = json.dumps(description, indent=2)
    (output_dir / "medaug_model.json").write_text(text + "\n")
    return json.loads(text)


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new model with old files; with `overwrite`, remove only what a model folder holds."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir}: exists and is not a folder")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{output_dir}: folder is not empty; choose another or pass --overwrite")
    for name in MODEL_ENTRIES:
        entry = output_dir / name
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.exists():
            entry.unlink()
