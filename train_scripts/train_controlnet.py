#!/usr/bin/env python
"""Train a ControlNet on edge maps, so generated images follow a given anatomy (and inherit its mask).

    accelerate launch train_scripts/train_controlnet.py \
        --lora_dir outputs/busi-lora --train_data_dir ../shared/datasets/busi --edge_method mask_boundary \
        --controlnet_train_mode full --max_train_steps 2000 --output_dir outputs/busi-controlnet

The ControlNet starts as a copy of the base UNet's encoder (after applying a finetune.py output folder given by
--lora_dir: its LoRA is fused in, or its full UNet used, and its condition encoder kept frozen). Edge maps are
made from each row's image/mask with --edge_method, after fitting to the training square, or read from
--conditioning_image_column (as `medaug edges` writes). --controlnet_train_mode lora trains LoRA adapters on the
copied encoder plus the ControlNet's own new layers (conditioning embedding and zero convolutions) instead of
every weight. Conditions, condition dropout, latent/feature caching, resume and mixed precision work as in
finetune.py, through the same helpers of medaug.training.

Phases: 1 load the base (and --lora_dir), 2 data (latents, condition features, edge maps), 3 the ControlNet,
4 optimizer, 5 resume, 6 train, 7 save: controlnet/ (stock `ControlNetModel.from_pretrained` loads it), a copy
of the --lora_dir weights and condition_encoder/, medaug_args.json, checkpoint-N/, validation/.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medaug.conditioning import CONDITION_KINDS, condition_class, load_projection
from medaug.console import reporting_errors
from medaug.data import DatasetFolder
from medaug.edges import EDGE_METHODS, MASK_METHODS, row_control_image
from medaug.embeddings import parse_shape
from medaug.run_loader import apply_run_weights
from medaug.run_record import RunRecord, read_run_record, write_run_record
from medaug.speed import DEFAULT_STEPS, choose_threads, frozen_weight_dtype, training_precision
from medaug.training.arguments import (HelpFormatter, add_config_flag, add_refused_diffusers_flags, dataset_folder,
                                       epoch_steps, parse_with_config, positive_int, set_tf32, train_steps)
from medaug.training.base_model import (check_base_flag, check_xformers, choose_attention, load_base,
                                        resolve_resolution, vae_downsampling)
from medaug.training.cache import DEFAULT_CACHE_DIR, TensorCache
from medaug.training.checkpoint import (load_checkpoint, prune_checkpoints, resolve_checkpoint,
                                        save_checkpoint)
from medaug.training.conditions import (batch_hidden_states, cached_features, validation_embeddings,
                                        validation_rows)
from medaug.training.data_order import EpochPermutationSampler, step_generator
from medaug.training.latents import batch_latents, cached_latents, image_channels, pixel_dataset, training_rows
from medaug.training.lora import LORA_WEIGHTS_NAME, UNET_TARGETS, add_lora
from medaug.training.loss import diffusion_loss
from medaug.training.loss_log import LOSS_HISTORY, LossHistory
from medaug.training.run_folder import claimed_run_folder
from medaug.training.validation import log_to_trackers, sample_images, save_grid, validation_scheduler

logger = logging.getLogger("medaug.controlnet")
# ControlNet's conditioning embedding downsamples once per entry after the first; take as many entries as the
# VAE downsamples in powers of two (2 for a two-level VAE, 4 for Stable Diffusion's).
CONDITIONING_CHANNELS = (16, 32, 96, 256)
CONFIGURATION_KEYS = ("pretrained_model_name_or_path", "lora_dir", "conditioning", "controlnet_train_mode", "rank",
                      "edge_method", "condition_tokens", "train_batch_size", "gradient_accumulation_steps", "seed")
DEFAULT_TRAIN_STEPS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_config_flag(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="Hub name or diffusers Stable Diffusion folder; None: the base of --lora_dir.")
    model.add_argument("--cache_dir", default=None,
                       help="Hugging Face Hub cache for a base or ControlNet given by Hub name, as in diffusers "
                            "(None: the Hub's own, under $HF_HOME). medaug's latent cache is --latent_cache_dir.")
    model.add_argument("--lora_dir", default=None,
                       help="finetune.py output folder: its LoRA (or full UNet) is applied to the base and its "
                            "condition encoder and condition flags are used.")
    model.add_argument("--controlnet_model_name_or_path", default=None,
                       help="Start from this ControlNet (folder or Hub name) instead of a copy of the UNet.")
    model.add_argument("--controlnet_train_mode", choices=("full", "lora"), default="full",
                       help="full: train every ControlNet weight; lora: LoRA on its attention projections plus "
                            "its new layers (conditioning embedding, zero convolutions).")
    model.add_argument("--rank", type=int, default=8, help="LoRA rank for --controlnet_train_mode lora.")
    model.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                       help="Training target; None: the base scheduler's.")
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs `pip install medaug[xformers]`); default is PyTorch SDPA.")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass (less memory, slower).")
    model.add_argument("--allow_tf32", action="store_true",
                       help="Allow TensorFloat-32 matrix products on Ampere and newer GPUs (faster); no effect on CPU.")

    data = parser.add_argument_group("data, edges and conditioning")
    data.add_argument("--train_data_dir", default=None,
                      help="Dataset folder with metadata.csv/jsonl (required unless --dataset_name names one).")
    data.add_argument("--dataset_name", default=None,
                      help="diffusers' flag: here a local dataset folder, used as --train_data_dir (Hub datasets "
                           "are refused: export one to a folder first).")
    data.add_argument("--split", default="train", help="Which split to train on.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Square training size; None: --lora_dir's, else the base UNet's sample size x VAE's.")
    data.add_argument("--edge_method", choices=tuple(EDGE_METHODS), default=None,
                      help="Make edge maps from each row's image (canny, sobel, scharr) or mask (mask_boundary, "
                           "fused); None: read them from --conditioning_image_column.")
    data.add_argument("--conditioning_image_column", default="conditioning_image_file_name",
                      help="Column of precomputed edge maps, used when --edge_method is not given.")
    data.add_argument("--fit", choices=("pad", "crop", "stretch"), default=None,
                      help="How images become square; None: --lora_dir's, else pad.")
    data.add_argument("--center_crop", action="store_true", help="diffusers' flag: the same as --fit crop.")
    data.add_argument("--conditioning", choices=tuple(CONDITION_KINDS), default=None,
                      help="What each image is conditioned on; None: --lora_dir's, else text.")
    data.add_argument("--caption_column", default=None,
                      help="Prompt column for --conditioning text; None: --lora_dir's, else text.")
    data.add_argument("--reference_column", default=None,
                      help="Column naming a reference image for clip_image; None: --lora_dir's, else the row's image.")
    data.add_argument("--image_encoder_name_or_path", default=None,
                      help="CLIP vision model for clip_image; None: --lora_dir's, else the base's image_encoder/.")
    data.add_argument("--embeddings_file", default=None,
                      help="Embeddings keyed by file_name for --conditioning embedding; None: --lora_dir's.")
    data.add_argument("--embedding_key_column", default=None,
                      help="Key column of a parquet embeddings file; None: --lora_dir's, else file_name.")
    data.add_argument("--embedding_value_column", default=None,
                      help="Value column of a parquet embeddings file; None: --lora_dir's, else embedding.")
    data.add_argument("--embedding_shape", type=parse_shape, default=None,
                      help="Reshape flat embeddings, e.g. 32,768; None: --lora_dir's, else as stored.")
    data.add_argument("--condition_tokens", type=int, default=None,
                      help="Tokens a vector condition is projected to; None: --lora_dir's, else 4.")
    data.add_argument("--condition_dropout", type=float, default=0.1,
                      help="Probability of replacing a condition by the unconditional embedding (the edge map "
                           "is always kept).")
    data.add_argument("--latent_cache_dir", default=str(DEFAULT_CACHE_DIR),
                      help="Where latents and condition features are cached across runs ($MEDAUG_CACHE).")
    data.add_argument("--no_cache", action="store_true", help="Encode images, conditions and edges every step.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="medaug-controlnet", help="The run folder to write.")
    train.add_argument("--overwrite", action="store_true",
                       help="Replace the run already in --output_dir (its weights, record, logs, checkpoints).")
    train.add_argument("--seed", type=int, default=0, help="Seed of initial weights, data order and noise.")
    train.add_argument("--train_batch_size", type=int, default=4, help="Images per process per micro-step.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-steps summed into one optimiser step.")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help=f"Optimiser steps; None: --num_train_epochs passes, else {DEFAULT_TRAIN_STEPS}.")
    train.add_argument("--num_train_epochs", type=positive_int, default=None,
                       help="Passes over the training rows, used when --max_train_steps is not given (steps = "
                            "epochs x rows / (batch x accumulation x processes), as diffusers counts them).")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    train.add_argument("--lr_scheduler", default="constant",
                       choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"), help="diffusers' learning-rate schedule.")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Steps of warm-up of the schedule.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradients are clipped to this norm.")
    train.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is typical).")
    train.add_argument("--noise_offset", type=float, default=0.0, help="Offset noise scale (0 turns it off).")
    train.add_argument("--mixed_precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                       help="auto: accelerate's configuration where `accelerate launch` sets one, else bf16 where the "
                            "device computes it natively (CUDA, or a CPU with AVX512-BF16/AMX), else no. Trained "
                            "weights stay fp32. The run record keeps the precision used.")
    train.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    train.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="Keep at most this many checkpoints (the newest); None: all.")
    train.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    train.add_argument("--report_to", default="tensorboard",
                       help='"tensorboard", "wandb", another accelerate tracker, "all" or "none"; loss, learning '
                            "rate and validation images go there.")
    train.add_argument("--logging_dir", default="logs", help="Tracker folder, inside --output_dir.")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_steps", type=int, default=None,
                            help="Sample images every N steps (saved under validation/ and sent to --report_to).")
    validation.add_argument("--validation_prompt", default=None,
                            help="Prompt for text runs; None: prompts/conditions of the first val rows.")
    validation.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    validation.add_argument("--validation_inference_steps", type=int, default=DEFAULT_STEPS,
                            help="Denoising steps of medaug generate's default sampler (DPM-Solver++).")
    validation.add_argument("--validation_guidance_scale", type=float, default=3.0, help="Classifier-free guidance.")
    validation.add_argument("--controlnet_conditioning_scale", type=float, default=1.0,
                            help="How strongly the edge map steers validation images.")
    add_refused_diffusers_flags(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "train_controlnet")
    args.train_data_dir = dataset_folder(args.train_data_dir, args.dataset_name)
    if args.center_crop:
        args.fit = "crop"
    resolve_condition_flags(args)
    check_base_flag(args.pretrained_model_name_or_path)
    for name in condition_class(args.conditioning).required_settings:
        if getattr(args, name, None) is None:
            raise ValueError(f"--{name} is required with --conditioning {args.conditioning}")
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}")
    check_xformers(args.enable_xformers_memory_efficient_attention)
    return args


def resolve_condition_flags(args: argparse.Namespace) -> None:
    """Fill the base model, resolution and condition flags from --lora_dir's run record, refusing flags that
    contradict it; without --lora_dir, the defaults."""
    if args.edge_method is None and args.conditioning_image_column is None:
        raise ValueError("give --edge_method or --conditioning_image_column")
    if not args.lora_dir:
        if args.pretrained_model_name_or_path is None:
            raise ValueError("give --pretrained_model_name_or_path or --lora_dir")
        args.conditioning, args.fit = args.conditioning or "text", args.fit or "pad"
        return
    record = read_run_record(args.lora_dir)
    if record.unet_mask_channels:
        raise ValueError(f"--lora_dir {args.lora_dir}: its UNet already reads the mask as input channels "
                         "(--mask_channels); it needs no ControlNet: generate from it with medaug generate --from_masks")
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = record.base_model
    elif not same_model(args.pretrained_model_name_or_path, record.base_model):
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} differs from "
                         f"the base of --lora_dir ({record.base_model}); leave it out to use that base")
    if args.resolution is None:
        args.resolution = record.resolution
    fixed = {"conditioning": record.conditioning, "fit": record.fit} | record.condition_settings
    for flag, from_run in fixed.items():
        given = getattr(args, flag, None)
        # The embeddings file may move; what it holds is checked against the run's condition encoder.
        if given is not None and str(given) != str(from_run) and flag != "embeddings_file":
            raise ValueError(f"--{flag} {given}: --lora_dir was trained with {from_run!r}; leave the flag out")
        setattr(args, flag, given if given is not None else from_run)


def same_model(first: str, second: str) -> bool:
    if Path(first).expanduser().exists() and Path(second).expanduser().exists():
        return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
    return first == second


# ---------------------------------------------------------------------------------------------------------
# 1. Base model, with --lora_dir applied
# ---------------------------------------------------------------------------------------------------------

def build_controlnet(args, unet, vae):
    from diffusers import ControlNetModel

    if args.controlnet_model_name_or_path:
        return ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, use_safetensors=True,
                                               cache_dir=args.cache_dir)
    vae_scale = vae_downsampling(vae)
    entries = int(math.log2(vae_scale)) + 1
    if entries > len(CONDITIONING_CHANNELS):
        raise ValueError(f"the base VAE downsamples {vae_scale}x; ControlNet supports up to "
                         f"{2 ** (len(CONDITIONING_CHANNELS) - 1)}x")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:entries])


def make_trainable(args, controlnet) -> None:
    """Full: every weight. LoRA: adapters on the copied attention, plus the layers a ControlNet adds, which
    start at zero and have nothing pretrained to adapt."""
    if args.controlnet_train_mode == "full":
        controlnet.requires_grad_(True)
        return
    add_lora(controlnet, args.rank, UNET_TARGETS)
    for new_part in (controlnet.controlnet_cond_embedding, controlnet.controlnet_down_blocks,
                     controlnet.controlnet_mid_block):
        new_part.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------
# 2. Edge maps
# ---------------------------------------------------------------------------------------------------------

def control_images(args, folder, rows: list[int], resolution: int, progress: bool = True) -> torch.Tensor:
    """(N, 3, R, R) uint8 edge maps of `rows` (uint8 keeps a 512 px dataset's maps small in memory)."""
    maps = [row_control_image(folder, index, resolution, args.fit, args.edge_method,
                              args.conditioning_image_column)
            for index in tqdm(rows, desc="edge maps", leave=False, disable=not progress)]
    stacked = np.round(np.stack(maps).transpose(0, 3, 1, 2) * 255.0).astype(np.uint8)
    return torch.from_numpy(stacked)


def check_edge_source(args, folder, rows: list[int]) -> None:
    """Every row has what its edge maps are made from, or the run stops naming the rows."""
    if args.edge_method is None:
        column, reason = args.conditioning_image_column, "has no edge map; pass --edge_method to make them"
    elif args.edge_method in MASK_METHODS:
        column, reason = "mask_file_name", f"has no mask; --edge_method {args.edge_method} needs one"
    else:
        return
    folder.require_filled(column, rows, f"column missing; {reason.split('; ')[1]}", f"row {reason}")


def batch_control(args, control, folder, rows, indices, resolution, device, dtype) -> torch.Tensor:
    """Edge maps of a batch in [0, 1], from the precomputed stack or (without a cache) made now."""
    if control is None:
        control = control_images(args, folder, [rows[i] for i in indices.tolist()], resolution, progress=False)
        return (control.float() / 255.0).to(device, dtype)
    return (control[indices].float() / 255.0).to(device, dtype)


# ---------------------------------------------------------------------------------------------------------
# Validation and saving
# ---------------------------------------------------------------------------------------------------------

def log_validation(args, step, condition, folder, vae, unet, controlnet, text_encoder, tokenizer, resolution,
                   accelerator):
    scheduler = validation_scheduler(args.pretrained_model_name_or_path, args.cache_dir)
    rows = validation_rows(folder, args.split, args.num_validation_images)
    hidden, negative = validation_embeddings(condition, folder, rows, accelerator.device, args.validation_prompt)
    control = control_images(args, folder, rows, resolution, progress=False).float() / 255.0
    count = min(len(rows), hidden.shape[0])
    with accelerator.autocast():
        images = sample_images(vae, unet, scheduler, hidden[:count], negative[:count],
                               args.validation_inference_steps, args.validation_guidance_scale, resolution,
                               args.seed, text_encoder=text_encoder, tokenizer=tokenizer,
                               controlnet=accelerator.unwrap_model(controlnet),
                               control_image=control[:count].to(accelerator.device),
                               controlnet_conditioning_scale=args.controlnet_conditioning_scale)
    # Each edge map above the image generated from it.
    pairs = np.concatenate([control[:count].permute(0, 2, 3, 1).numpy(), images], axis=1)
    path = save_grid(pairs, Path(args.output_dir) / "validation" / f"step-{step:06d}.png")
    log_to_trackers(accelerator.trackers, pairs, step)
    logger.info("validation images: %s", path)
    return path


def save_controlnet(controlnet, path: Path, train_mode: str) -> None:
    """controlnet/ as stock diffusers loads it; a LoRA-trained one is saved with its adapters merged."""
    if train_mode == "lora":
        controlnet.fuse_lora()
        controlnet.unload_lora()
    controlnet.save_pretrained(path, safe_serialization=True)


def save_outputs(args, accelerator, controlnet, condition, projection_trained, record: RunRecord):
    """controlnet/, the condition encoder and --lora_dir's weights (so the folder is all generation needs)."""
    output_dir = Path(args.output_dir)
    save_controlnet(accelerator.unwrap_model(controlnet), output_dir / "controlnet", args.controlnet_train_mode)
    if condition.projection is not None:
        projection = accelerator.unwrap_model(condition.projection) if projection_trained else condition.projection
        projection.save_pretrained(output_dir / "condition_encoder", safe_serialization=True)
    if args.lora_dir:
        lora_dir = Path(args.lora_dir)
        if (lora_dir / LORA_WEIGHTS_NAME).is_file():
            shutil.copyfile(lora_dir / LORA_WEIGHTS_NAME, output_dir / LORA_WEIGHTS_NAME)
        if (lora_dir / "unet").is_dir():
            shutil.copytree(lora_dir / "unet", output_dir / "unet", dirs_exist_ok=True)
    write_run_record(output_dir, record)


def run_record(args, settings: dict, resolution: int, channels: int, scaling_factor: float, global_step: int,
               accelerator) -> RunRecord:
    """The ControlNet run's record; the UNet is as --lora_dir left it (copied into this folder)."""
    tuned = read_run_record(args.lora_dir) if args.lora_dir else None
    return RunRecord(
        base_model=args.pretrained_model_name_or_path, resolution=resolution, script="train_controlnet",
        conditioning=args.conditioning, condition_settings=settings,
        unet_train_mode=tuned.unet_train_mode if tuned else "frozen", rank=tuned.rank if tuned else None,
        train_text_encoder=tuned.train_text_encoder if tuned else False, fit=args.fit, channels=channels,
        prediction_type=args.prediction_type, vae_scaling_factor=scaling_factor, controlnet=True,
        controlnet_train_mode=args.controlnet_train_mode, edge_method=args.edge_method,
        conditioning_image_column=None if args.edge_method else args.conditioning_image_column,
        lora_dir=str(Path(args.lora_dir).resolve()) if args.lora_dir else None,
        train_data_dir=str(Path(args.train_data_dir).resolve()), split=args.split, steps=global_step,
        seed=args.seed, num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
        arguments=vars(args) | {"mixed_precision": accelerator.mixed_precision})  # replays at the precision used


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    """Train, holding --output_dir from before the first step until the run is saved (refused while another run
    writes there, or while it holds another run that is neither resumed nor overwritten)."""
    with claimed_run_folder(args.output_dir, args.resume_from_checkpoint, args.overwrite):
        return train(args)


def train(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=training_precision(args.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu"),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_tf32(args.allow_tf32)
    logger.info("torch threads %d (%s), mixed precision %s", *choose_threads(), accelerator.mixed_precision)
    weight_dtype = frozen_weight_dtype(accelerator.mixed_precision, accelerator.device, takes_fp32_inputs=True)

    # 1. Base model with --lora_dir applied; the data folder and edge sources are checked first.
    folder = DatasetFolder(args.train_data_dir)
    rows = training_rows(folder, args.split, args.max_train_samples)
    args.max_train_steps = train_steps(args.max_train_steps, args.num_train_epochs,
                                       epoch_steps(len(rows), args.train_batch_size, args.gradient_accumulation_steps,
                                                   accelerator.num_processes), DEFAULT_TRAIN_STEPS)
    check_edge_source(args, folder, rows)
    channels = image_channels(folder, rows)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_base(args.pretrained_model_name_or_path,
                                                                    args.prediction_type, cache_dir=args.cache_dir)
    if args.lora_dir:
        unet, text_encoder = apply_run_weights(args.lora_dir, tokenizer, text_encoder, vae, unet, noise_scheduler)
    resolution = resolve_resolution(args.resolution, vae, unet)
    torch.manual_seed(args.seed)
    kind = condition_class(args.conditioning)
    settings = kind.settings_from(vars(args))
    condition = kind.build(args.pretrained_model_name_or_path, unet.config.cross_attention_dim, tokenizer,
                           text_encoder, settings)
    projection_trained = condition.projection is not None and not (
        args.lora_dir and (Path(args.lora_dir) / "condition_encoder").is_dir())
    if condition.projection is not None and not projection_trained:
        condition.projection = load_projection(args.lora_dir).requires_grad_(False).to(accelerator.device)
    if args.lora_dir and condition.cache_sources is not None:
        # A fused text-encoder LoRA changes the features, so --lora_dir's files are part of their cache key.
        condition.cache_sources = (*condition.cache_sources, Path(args.lora_dir) / LORA_WEIGHTS_NAME)
    inputs = condition.inputs(folder, rows)
    vae.to(accelerator.device)  # fp32: the VAE decodes to NaN in fp16 on some inputs
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    for frozen in condition.frozen_modules():
        frozen.to(accelerator.device, dtype=weight_dtype)

    # 2. Latents, condition features (cached as finetune.py does) and edge maps (made once per run).
    cache = TensorCache(args.latent_cache_dir)
    dataset = pixel_dataset(folder, args.split, rows, resolution, args.fit)
    latents = None if args.no_cache else cached_latents(vae, Path(args.pretrained_model_name_or_path) / "vae",
                                                        dataset, args.fit, cache, accelerator)
    features = None if args.no_cache else cached_features(condition, inputs, cache, accelerator)
    control = None if args.no_cache else control_images(args, folder, rows, resolution)
    resume_path = (resolve_checkpoint(output_dir, args.resume_from_checkpoint)
                   if args.resume_from_checkpoint else None)

    # 3. The ControlNet, and what of it trains.
    torch.manual_seed(args.seed + 1)
    controlnet = build_controlnet(args, unet, vae)  # copied from the fp32 UNet, before it is cast
    unet.to(accelerator.device, dtype=weight_dtype)
    make_trainable(args, controlnet)
    logger.info("attention: %s", choose_attention(args.enable_xformers_memory_efficient_attention,
                                                   accelerator.mixed_precision, accelerator.device, unet, controlnet))
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    trainable = {"controlnet": controlnet}
    if projection_trained:
        trainable["condition_encoder"] = condition.projection
    parameters = [p for module in trainable.values() for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()  # trainable weights stay fp32 under mixed precision
    controlnet.to(accelerator.device)

    # 4. Optimizer, schedule, data order.
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(torch.arange(len(rows)), batch_size=args.train_batch_size,
                                         sampler=EpochPermutationSampler(len(rows), args.seed),
                                         drop_last=len(rows) >= args.train_batch_size)
    modules = list(trainable.values())
    prepared = accelerator.prepare(*modules, optimizer, loader, lr_scheduler)
    modules, optimizer, loader, lr_scheduler = prepared[:len(modules)], *prepared[len(modules):]
    trainable = dict(zip(trainable, modules))
    controlnet = trainable["controlnet"]
    if projection_trained:
        condition.projection = trainable["condition_encoder"]

    # 5. Resume.
    configuration = {key: getattr(args, key) for key in CONFIGURATION_KEYS} | {"resolution": resolution}
    global_step = 0
    if resume_path is not None:
        global_step = load_checkpoint(resume_path, {k: accelerator.unwrap_model(m) for k, m in trainable.items()},
                                      optimizer, lr_scheduler, configuration)
        logger.info("resumed from %s at step %d", resume_path, global_step)
    steps_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("medaug-controlnet", config={k: str(v) for k, v in vars(args).items()})

    # 6. Train: the frozen UNet denoises with the ControlNet's residuals added.
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
        epoch_loader.set_epoch(epoch)
        for indices in epoch_loader:
            indices = indices.cpu()
            generator = step_generator(args.seed, micro_step, accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(*modules):
                model_latents, _ = batch_latents(latents, vae, dataset, indices, generator, scaling_factor, False,
                                                 accelerator.device)
                model_latents = model_latents.to(weight_dtype)
                hidden = batch_hidden_states(condition, features, inputs, indices, generator, accelerator.device,
                                             weight_dtype, args.condition_dropout).to(weight_dtype)
                edges = batch_control(args, control, folder, rows, indices, resolution, accelerator.device,
                                      weight_dtype)

                def predict(noisy, timesteps, hidden_states):
                    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden_states,
                                           controlnet_cond=edges, return_dict=False)
                    with accelerator.autocast():  # the frozen UNet is not prepared, so not autocast by accelerate
                        return unet(noisy, timesteps, hidden_states,
                                    down_block_additional_residuals=[r.to(weight_dtype) for r in down],
                                    mid_block_additional_residual=mid.to(weight_dtype)).sample

                loss = diffusion_loss(predict, noise_scheduler, model_latents, hidden, generator, args.noise_offset,
                                      args.snr_gamma)
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
                log_validation(args, global_step, condition, folder, vae, unet, controlnet, text_encoder,
                               tokenizer, resolution, accelerator)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    train_seconds = time.perf_counter() - started

    # 7. Save the output folder.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = run_record(args, settings, resolution, channels, scaling_factor, global_step, accelerator)
        save_outputs(args, accelerator, controlnet, condition, projection_trained, record)
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "computed": list(cache.computed),
            "resolution": resolution, "output_dir": str(output_dir), "train_seconds": train_seconds,
            "steps_per_second": (global_step - first_step) / train_seconds if train_seconds else 0.0}


if __name__ == "__main__":
    with reporting_errors():  # bad input: one `error:` line and exit status 2
        main(parse_args())
