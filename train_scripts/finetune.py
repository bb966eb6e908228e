#!/usr/bin/env python
"""Fine-tune latent Stable Diffusion on a medical dataset folder, conditioned on text, a reference image or a
precomputed foundation-model embedding.

    accelerate launch train_scripts/finetune.py \
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --train_data_dir ../shared/datasets/busi --conditioning text --resolution 256 \
        --train_batch_size 4 --max_train_steps 2000 --output_dir outputs/busi-lora

Phases: 1 load the base, 2 check and cache the data (VAE latents and frozen condition features), 3 add LoRA
(or train the UNet fully for a from-scratch base), 4 optimizer, 5 resume, 6 train, 7 save an output folder
that generation reads: pytorch_lora_weights.safetensors, condition_encoder/, unet/ (full mode),
medaug_args.json, checkpoint-N/, logs/, validation/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medaug.conditioning import CONDITION_KINDS
from medaug.data import DatasetError, DatasetFolder, MedicalImageDataset
from medaug.embeddings import EmbeddingError
from medaug.training.cache import DEFAULT_CACHE_DIR, TensorCache, file_identity, folder_identity
from medaug.training.checkpoint import (CheckpointError, load_checkpoint, prune_checkpoints, resolve_checkpoint,
                                        save_checkpoint)
from medaug.training.data_order import EpochPermutationSampler, step_generator
from medaug.training.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora
from medaug.training.loss_log import LOSS_HISTORY, LossHistory
from medaug.training.validation import sample_images, save_grid

logger = logging.getLogger("medaug.finetune")
# Arguments that define what a checkpoint holds: resuming with any of them changed is refused.
CONFIGURATION_KEYS = ("pretrained_model_name_or_path", "conditioning", "train_mode", "rank", "train_text_encoder",
                      "resolution", "condition_tokens", "train_batch_size",
                      "gradient_accumulation_steps", "seed")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Hub name or local diffusers Stable Diffusion folder (e.g. from `medaug init-model`).")
    model.add_argument("--train_mode", choices=("lora", "full"), default="lora",
                       help="lora: LoRA on the UNet attention projections (pretrained bases); "
                            "full: train the whole UNet (from-scratch bases).")
    model.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    model.add_argument("--train_text_encoder", action="store_true",
                       help="Also put LoRA on the CLIP text encoder (text conditioning only).")
    model.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                       help="Training target; default: the base scheduler's.")
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs `pip install medaug[xformers]`); default is PyTorch SDPA.")
    model.add_argument("--gradient_checkpointing", action="store_true")

    data = parser.add_argument_group("data and conditioning")
    data.add_argument("--train_data_dir", required=True, help="Dataset folder with metadata.csv/jsonl.")
    data.add_argument("--split", default="train", help="Which split to train on.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Square training size in pixels; default: the base UNet's sample size times the VAE's.")
    data.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad", help="How images become square.")
    data.add_argument("--random_flip", action="store_true", help="Flip latents horizontally at random.")
    data.add_argument("--conditioning", choices=tuple(CONDITION_KINDS), default="text")
    data.add_argument("--caption_column", default="text", help="Prompt column for --conditioning text.")
    data.add_argument("--reference_column", default=None,
                      help="Column naming a reference image for --conditioning clip_image; default: the row's image.")
    data.add_argument("--image_encoder_name_or_path", default=None,
                      help="CLIP vision model for clip_image; default: the base folder's image_encoder/.")
    data.add_argument("--embeddings_file", default=None,
                      help="Embeddings keyed by file_name (.safetensors, .npz, .parquet) for --conditioning embedding.")
    data.add_argument("--embedding_key_column", default="file_name", help="Key column of a parquet embeddings file.")
    data.add_argument("--embedding_value_column", default="embedding", help="Value column of a parquet file.")
    data.add_argument("--embedding_shape", default=None,
                      help="Reshape flat embeddings, e.g. 32,768 for ELIXR; default: as stored.")
    data.add_argument("--condition_tokens", type=int, default=4,
                      help="Tokens a vector condition (image embedding, (D,) embedding) is projected to.")
    data.add_argument("--condition_dropout", type=float, default=0.1,
                      help="Probability of replacing a condition by the unconditional embedding (for guidance).")
    data.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR),
                      help="Where latents and condition features are cached across runs ($MEDAUG_CACHE).")
    data.add_argument("--no_cache", action="store_true",
                      help="Encode images and conditions at every step, as a stock training loop does (slower; "
                           "for comparison and for data too large to cache).")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="medaug-finetune")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=4)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=1000)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--lr_scheduler", default="constant",
                       choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"))
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is typical).")
    train.add_argument("--noise_offset", type=float, default=0.0)
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                       help="Default: accelerate's configuration.")
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    train.add_argument("--report_to", default="tensorboard", help='"tensorboard" or "none".')
    train.add_argument("--logging_dir", default="logs", help="TensorBoard folder, inside --output_dir.")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_steps", type=int, default=None, help="Sample images every N steps.")
    validation.add_argument("--validation_prompt", default=None,
                            help="Prompt for text runs; default: prompts/conditions of the first val rows.")
    validation.add_argument("--num_validation_images", type=int, default=4)
    validation.add_argument("--validation_inference_steps", type=int, default=25)
    validation.add_argument("--validation_guidance_scale", type=float, default=3.0)
    args = parser.parse_args(input_args)
    check_flags(args)
    return args


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before any model is loaded."""
    base = args.pretrained_model_name_or_path
    looks_local = base.startswith(("/", ".", "~")) or base.count("/") > 1 or Path(base).exists()
    if looks_local and not (Path(base).expanduser() / "model_index.json").is_file():
        raise ValueError(f"--pretrained_model_name_or_path: {base} is not a diffusers model folder "
                         "(no model_index.json); make one with `medaug init-model` or give a Hub name")
    if args.conditioning == "embedding" and not args.embeddings_file:
        raise ValueError("--embeddings_file is required with --conditioning embedding")
    if args.train_text_encoder and args.conditioning != "text":
        raise ValueError("--train_text_encoder only applies to --conditioning text")
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}")
    if args.embedding_shape:
        args.embedding_shape = [int(part) for part in str(args.embedding_shape).split(",")]
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                         "(pip install 'medaug[xformers]', CUDA only); without the flag PyTorch SDPA is used")


# ---------------------------------------------------------------------------------------------------------
# 1. Base model
# ---------------------------------------------------------------------------------------------------------

def load_base(args):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def resolve_resolution(args, vae, unet) -> int:
    """The training resolution, refused unless the VAE and the UNet's downsampling both divide it."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution is None:
        return unet.config.sample_size * vae_scale
    unet_scale = 2 ** (len(unet.config.block_out_channels) - 1)
    step = vae_scale * unet_scale
    if args.resolution % step:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {step} (VAE downsamples "
                         f"{vae_scale}x, UNet {unet_scale}x), e.g. {max(step, args.resolution // step * step)}")
    return args.resolution


# ---------------------------------------------------------------------------------------------------------
# 2. Data: rows, latents and condition features (cached)
# ---------------------------------------------------------------------------------------------------------

def training_rows(folder: DatasetFolder, split: str, max_samples: int | None) -> list[int]:
    rows = folder.indices(split)
    return rows[:max_samples] if max_samples else rows


def pixel_dataset(args, folder, rows, resolution) -> MedicalImageDataset:
    """The training rows as [-1, 1] RGB tensors; building it checks every file."""
    dataset = MedicalImageDataset(folder, split=args.split, resolution=resolution, channels=3, fit=args.fit)
    dataset.indices = rows
    return dataset


def encode_latents(vae, dataset: MedicalImageDataset, positions: list[int]) -> dict[str, torch.Tensor]:
    """Mean and std of the VAE posterior of the dataset items at `positions`."""
    pixels = torch.stack([dataset[i]["pixel_values"] for i in positions])
    with torch.no_grad():
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"mean": distribution.mean.float().cpu(), "std": distribution.std.float().cpu()}


def encode_all_latents(vae, dataset: MedicalImageDataset, batch_size: int = 8) -> dict[str, torch.Tensor]:
    parts = [encode_latents(vae, dataset, list(range(start, min(start + batch_size, len(dataset)))))
             for start in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", leave=False)]
    return {key: torch.cat([part[key] for part in parts]) for key in ("mean", "std")}


def cached_latents(args, vae, folder, rows, dataset, cache: TensorCache, accelerator) -> dict[str, torch.Tensor] | None:
    """Latent distributions of every training row, from the cache or computed once; None with --no_cache."""
    if args.no_cache:
        return None
    resolution = dataset.resolution
    key = {"kind": "latents-v1", "vae": folder_identity(Path(args.pretrained_model_name_or_path) / "vae"),
           "resolution": resolution, "fit": args.fit,
           "rows": [(file_identity(folder.path(i, "file_name")), folder.value(i, "slice_index")) for i in rows]}
    with accelerator.main_process_first():
        return cache.load_or_compute("latents", key, lambda: encode_all_latents(vae, dataset),
                                     write=accelerator.is_main_process)


def build_condition(args, tokenizer, text_encoder, cross_attention_dim):
    """The condition object of --conditioning (with a new projection where the kind has one)."""
    return CONDITION_KINDS[args.conditioning].build(
        base=args.pretrained_model_name_or_path, cross_attention_dim=cross_attention_dim, tokenizer=tokenizer,
        text_encoder=text_encoder, caption_column=args.caption_column, reference_column=args.reference_column,
        image_encoder_path=args.image_encoder_name_or_path, embeddings_file=args.embeddings_file,
        embedding_key_column=args.embedding_key_column, embedding_value_column=args.embedding_value_column,
        embedding_shape=tuple(args.embedding_shape) if args.embedding_shape else None,
        condition_tokens=args.condition_tokens)


def compute_features(condition, inputs, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(inputs), batch_size), desc="encoding conditions", leave=False,
                      disable=not progress):
        with torch.no_grad():
            chunks.append(condition.features(inputs[start:start + batch_size]).float().cpu())
    return torch.cat(chunks)


def cached_features(args, condition, inputs, cache: TensorCache, accelerator) -> torch.Tensor | None:
    """Frozen condition features per row, or None to encode each batch (--no_cache, text-encoder LoRA)."""
    if args.train_text_encoder or args.no_cache:
        return None
    if condition.cache_sources is None:
        return compute_features(condition, inputs)  # precomputed already: nothing worth caching
    key = {"kind": f"{condition.kind}-features-v1",
           "sources": [folder_identity(path) for path in condition.cache_sources],
           "inputs": condition.input_identity(inputs)}
    with accelerator.main_process_first():
        return cache.load_or_compute(f"{condition.kind}-features", key,
                                     lambda: {"features": compute_features(condition, inputs)},
                                     write=accelerator.is_main_process)["features"]


# ---------------------------------------------------------------------------------------------------------
# 6. One training step's loss
# ---------------------------------------------------------------------------------------------------------

def diffusion_loss(args, predict, noise_scheduler, latents, hidden_states, generator) -> torch.Tensor:
    """The denoising loss of `predict(noisy_latents, timesteps, hidden_states)` (the UNet, or the UNet with a
    ControlNet's residuals) on fresh noise and timesteps drawn from `generator`."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                 generator=generator).to(latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = predict(noisy, timesteps, hidden_states)
    if args.snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=args.snr_gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=args.snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def batch_latents(latents, vae, dataset, indices, generator, scaling_factor, random_flip, device):
    """Scaled latents of a batch, drawn from cached posteriors or (without a cache) encoded now."""
    if latents is None:
        posterior = encode_latents(vae, dataset, indices.tolist())
    else:
        posterior = {key: value[indices] for key, value in latents.items()}
    mean, std = posterior["mean"], posterior["std"]
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    if random_flip:
        flip = torch.rand(sample.shape[0], generator=generator) < 0.5
        sample[flip] = sample[flip].flip(-1)
    return (sample * scaling_factor).to(device)


def batch_hidden_states(args, condition, features, inputs, indices, generator, device, dtype):
    if features is not None:
        batch_features = features[indices].to(device)
    elif args.train_text_encoder:  # gradients must flow into the text encoder
        batch_features = condition.features([inputs[i] for i in indices.tolist()])
    else:
        batch_features = compute_features(condition, [inputs[i] for i in indices.tolist()],
                                          progress=False).to(device)
    hidden = condition.hidden_states(batch_features.to(dtype) if condition.projection is None else batch_features)
    if args.condition_dropout > 0:
        drop = (torch.rand(hidden.shape[0], generator=generator) < args.condition_dropout).to(device)
        unconditional = condition.unconditional_embedding(hidden.shape[0]).to(hidden.dtype)
        hidden = torch.where(drop[:, None, None], unconditional, hidden)
    return hidden


# ---------------------------------------------------------------------------------------------------------
# Validation and saving
# ---------------------------------------------------------------------------------------------------------

def validation_embeddings(args, condition, folder, accelerator):
    """Condition embeddings for validation images: --validation_prompt, else the first val (or train) rows."""
    if condition.kind == "text" and args.validation_prompt:
        inputs = [args.validation_prompt] * args.num_validation_images
    else:
        split = "val" if any(folder.split(i) == "val" for i in range(len(folder))) else args.split
        inputs = condition.inputs(folder, folder.indices(split)[: args.num_validation_images])
    features = compute_features(condition, inputs).to(accelerator.device)
    with torch.no_grad():
        hidden = condition.hidden_states(features)
        negative = condition.unconditional_embedding(hidden.shape[0]).to(hidden.dtype)
    return hidden, negative


def log_validation(args, step, condition, folder, vae, unet, text_encoder, tokenizer, resolution, accelerator):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    hidden, negative = validation_embeddings(args, condition, folder, accelerator)
    with accelerator.autocast():
        images = sample_images(vae, accelerator.unwrap_model(unet), scheduler, hidden, negative,
                               args.validation_inference_steps, args.validation_guidance_scale, resolution,
                               args.seed, text_encoder=text_encoder, tokenizer=tokenizer)
    path = save_grid(images, Path(args.output_dir) / "validation" / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")
    logger.info("validation images: %s", path)
    return path


def save_outputs(args, accelerator, unet, text_encoder, condition, resolution, scaling_factor):
    output_dir = Path(args.output_dir)
    unet = accelerator.unwrap_model(unet)
    if args.train_mode == "lora":
        save_lora(output_dir, unet, accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None)
    else:
        unet.save_pretrained(output_dir / "unet", safe_serialization=True)
    if condition.projection is not None:
        accelerator.unwrap_model(condition.projection).save_pretrained(output_dir / "condition_encoder",
                                                                       safe_serialization=True)
    base = Path(args.pretrained_model_name_or_path).expanduser()
    record = dict(vars(args), resolution=resolution, vae_scaling_factor=scaling_factor,
                  num_processes=accelerator.num_processes,
                  base_model=str(base.resolve()) if base.is_dir() else args.pretrained_model_name_or_path)
    (output_dir / "medaug_args.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        # Without an accelerator, say so: then several launched processes form a CPU (gloo) group instead
        # of each training alone.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 1. Load the base model; check the data folder before anything slow.
    folder = DatasetFolder(args.train_data_dir)
    rows = training_rows(folder, args.split, args.max_train_samples)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_base(args)
    resolution = resolve_resolution(args, vae, unet)
    torch.manual_seed(args.seed)  # new projections start the same in every run of this seed
    condition = build_condition(args, tokenizer, text_encoder, unet.config.cross_attention_dim)
    inputs = condition.inputs(folder, rows)  # checks every row's prompt, reference image or embedding
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    vae.to(accelerator.device)  # the VAE stays fp32: it decodes to NaN in fp16 on some inputs
    text_encoder.to(accelerator.device, dtype=torch.float32 if args.train_text_encoder else weight_dtype)
    for frozen in condition.frozen_modules():
        frozen.to(accelerator.device, dtype=weight_dtype)

    # 2. Latents and condition features, cached across epochs and runs.
    cache = TensorCache(args.cache_dir)
    dataset = pixel_dataset(args, folder, rows, resolution)
    latents = cached_latents(args, vae, folder, rows, dataset, cache, accelerator)
    features = cached_features(args, condition, inputs, cache, accelerator)
    resume_path = (resolve_checkpoint(output_dir, args.resume_from_checkpoint)
                   if args.resume_from_checkpoint else None)

    # 3. What trains: LoRA or the whole UNet, the text encoder's LoRA, the condition projection.
    torch.manual_seed(args.seed + 1)
    if args.train_mode == "lora":
        add_lora(unet, args.rank, UNET_TARGETS)
    else:
        unet.requires_grad_(True)
    if args.train_text_encoder:
        add_lora(text_encoder, args.rank, TEXT_ENCODER_TARGETS)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = {"unet": unet}
    if args.train_text_encoder:
        trainable["text_encoder"] = text_encoder
    if condition.projection is not None:
        trainable["condition_encoder"] = condition.projection
    parameters = [p for module in trainable.values() for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()  # trainable weights stay fp32 under mixed precision

    # 4. Optimizer, schedule, data order.
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    sampler = EpochPermutationSampler(len(rows), args.seed)
    loader = torch.utils.data.DataLoader(torch.arange(len(rows)), batch_size=args.train_batch_size, sampler=sampler,
                                         drop_last=len(rows) >= args.train_batch_size)
    modules = list(trainable.values())
    prepared = accelerator.prepare(*modules, optimizer, loader, lr_scheduler)
    modules, optimizer, loader, lr_scheduler = prepared[:len(modules)], *prepared[len(modules):]
    trainable = dict(zip(trainable, modules))
    unet = trainable["unet"]
    if condition.projection is not None:
        condition.projection = trainable["condition_encoder"]
    if args.train_text_encoder:
        condition.text_encoder = trainable["text_encoder"]

    # 5. Resume: weights, optimizer and schedule; randomness and data order follow from the step.
    configuration = {key: getattr(args, key) for key in CONFIGURATION_KEYS} | {
        "resolution": resolution,
        "condition_features": list(condition.projection.feature_shape) if condition.projection is not None else None}
    global_step = 0
    if resume_path is not None:
        global_step = load_checkpoint(resume_path, {k: accelerator.unwrap_model(m) for k, m in trainable.items()},
                                      optimizer, lr_scheduler, configuration)
        logger.info("resumed from %s at step %d", resume_path, global_step)
    steps_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("medaug-finetune", config={k: str(v) for k, v in vars(args).items()})

    # 6. Train.
    scaling_factor = vae.config.scaling_factor
    losses = []
    history = LossHistory(output_dir / LOSS_HISTORY, global_step, enabled=accelerator.is_main_process)
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    micro_step = global_step * args.gradient_accumulation_steps
    first_step, started = global_step, time.perf_counter()
    while global_step < args.max_train_steps:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        skip = done_in_epoch * args.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch_loader.set_epoch(epoch)  # accelerate's loaders reset the sampler's epoch to their own count
        for indices in epoch_loader:
            generator = step_generator(args.seed, micro_step, accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(*modules):
                model_latents = batch_latents(latents, vae, dataset, indices.cpu(), generator, scaling_factor,
                                              args.random_flip, accelerator.device).to(weight_dtype)
                hidden = batch_hidden_states(args, condition, features, inputs, indices.cpu(), generator,
                                             accelerator.device, weight_dtype)
                loss = diffusion_loss(args, lambda noisy, t, h: unet(noisy, t, h).sample, noise_scheduler,
                                      model_latents, hidden.to(weight_dtype), generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            step_loss = accelerator.gather(loss.detach()).mean().item()
            losses.append(step_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            accelerator.log({"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
            history.log(global_step, loss=step_loss, lr=lr_scheduler.get_last_lr()[0])
            if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                save_checkpoint(output_dir / f"checkpoint-{global_step}", global_step,
                                {k: accelerator.unwrap_model(m) for k, m in trainable.items()},
                                optimizer, lr_scheduler, configuration)
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(args, global_step, condition, folder, vae, unet, text_encoder, tokenizer,
                               resolution, accelerator)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    train_seconds = time.perf_counter() - started

    # 7. Save the output folder.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(args, accelerator, unet, text_encoder, condition, resolution, scaling_factor)
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "computed": list(cache.computed),
            "resolution": resolution, "output_dir": str(output_dir), "train_seconds": train_seconds,
            "steps_per_second": (global_step - first_step) / train_seconds if train_seconds else 0.0}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DatasetError, EmbeddingError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
