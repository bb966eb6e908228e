"""LoRA on the UNet (and optionally the text encoder), saved in the layout stock diffusers loads."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(model: torch.nn.Module, rank: int, targets: tuple[str, ...], alpha: float | None = None) -> None:
    """Attach a LoRA adapter; only its parameters stay trainable. B starts at zero, so it starts as a no-op."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                 target_modules=list(targets)))


def diffusers_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(output_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` that `StableDiffusionPipeline.load_lora_weights` reads."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(output_dir),
        unet_lora_layers=diffusers_lora_state(unet),
        text_encoder_lora_layers=diffusers_lora_state(text_encoder) if text_encoder is not None else None,
        safe_serialization=True,
    )
    return Path(output_dir) / LORA_WEIGHTS_NAME
