"""The base model a training script starts from: checked, loaded frozen, and the resolution it can take."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medaug.files import pickled_files


def check_base_flag(base: str) -> None:
    """A local-looking --pretrained_model_name_or_path must be a diffusers folder; anything else is a Hub name."""
    looks_local = base.startswith(("/", ".", "~")) or base.count("/") > 1 or Path(base).exists()
    if looks_local and not (Path(base).expanduser() / "model_index.json").is_file():
        raise ValueError(f"--pretrained_model_name_or_path: {base} is not a diffusers model folder "
                         "(no model_index.json); make one with `medaug init-model` or give a Hub name")
    for component in ("unet", "vae", "text_encoder") if looks_local else ():
        folder = Path(base).expanduser() / component
        if pickled_files(folder) and not any(folder.glob("*.safetensors")):
            raise ValueError(f"--pretrained_model_name_or_path: {folder} holds pickle weights only "
                             f"({', '.join(pickled_files(folder))}), which medaug never loads; convert them to "
                             "safetensors")


def check_xformers(requested: bool) -> None:
    if requested and importlib.util.find_spec("xformers") is None:
        raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                         "(pip install 'medaug[xformers]', CUDA only); without the flag PyTorch SDPA is used")


MATMUL_BACKWARD_ATTENTION = "SDPA forward, matmul backward (bf16 on a CPU)"


def training_attention(xformers: bool, mixed_precision: str, device) -> str:
    """The attention training uses: xformers when asked; on a CPU training in bf16, medaug.models.attention's
    processor (the fused forward with a matmul backward, faster there); otherwise diffusers' default, SDPA."""
    import torch

    if xformers:
        return "xformers"
    if mixed_precision == "bf16" and torch.device(device).type == "cpu":
        return MATMUL_BACKWARD_ATTENTION
    return "SDPA"


def choose_attention(xformers: bool, mixed_precision: str, device, *models) -> str:
    """Give `models` the attention of `training_attention` and return its name."""
    choice = training_attention(xformers, mixed_precision, device)
    for model in models:
        if choice == "xformers":
            model.enable_xformers_memory_efficient_attention()
        elif choice == MATMUL_BACKWARD_ATTENTION:
            from medaug.models.attention import use_matmul_backward_attention

            use_matmul_backward_attention(model)
    return choice


def load_base(base: str, prediction_type: str | None = None, cache_dir: str | None = None):
    """(tokenizer, text_encoder, vae, unet, noise_scheduler) of a base, every module frozen; `cache_dir` is the
    Hugging Face Hub cache a Hub name is read through (None: the Hub's default)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", cache_dir=cache_dir)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True,
                                                 cache_dir=cache_dir)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True, cache_dir=cache_dir)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True, cache_dir=cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", cache_dir=cache_dir)
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def vae_downsampling(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_resolution(resolution: int | None, vae, unet) -> int:
    """The training resolution (default: the UNet's sample size in pixels), refused unless the VAE and the
    UNet's downsampling both divide it."""
    vae_scale = vae_downsampling(vae)
    if resolution is None:
        return unet.config.sample_size * vae_scale
    unet_scale = 2 ** (len(unet.config.block_out_channels) - 1)
    step = vae_scale * unet_scale
    if resolution % step:
        raise ValueError(f"--resolution {resolution}: must be a multiple of {step} (VAE downsamples "
                         f"{vae_scale}x, UNet {unet_scale}x), e.g. {max(step, resolution // step * step)}")
    return resolution
