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
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medaug.conditioning import CONDITION_KINDS, condition_class
from medaug.console import reporting_errors
from medaug.data import DatasetFolder
from medaug.embeddings import parse_shape
from medaug.metrics.fidelity import FidelitySegmenter
from medaug.run_record import RunRecord, write_run_record
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
from medaug.training.consistency import MaskConsistencyLoss
from medaug.training.data_order import EpochPermutationSampler, step_generator
from medaug.training.latents import batch_latents, cached_latents, image_channels, pixel_dataset, training_rows
from medaug.training.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora
from medaug.training.loss import diffusion_loss
from medaug.training.loss_log import LOSS_HISTORY, LossHistory
from medaug.training.mask_channels import latent_masks, row_masks, widen_conv_in
from medaug.training.run_folder import claimed_run_folder
from medaug.training.validation import log_to_trackers, sample_images, save_grid, validation_scheduler

logger = logging.getLogger("medaug.finetune")
# Arguments that define what a checkpoint holds: resuming with any of them changed is refused.
CONFIGURATION_KEYS = ("pretrained_model_name_or_path", "conditioning", "train_mode", "rank", "train_text_encoder",
                      "mask_channels",
                      "resolution", "condition_tokens", "train_batch_size",
                      "gradient_accumulation_steps", "seed")
DEFAULT_TRAIN_STEPS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_config_flag(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Hub name or local diffusers Stable Diffusion folder (e.g. from `medaug init-model`).")
    model.add_argument("--cache_dir", default=None,
                       help="Hugging Face Hub cache for a base given by Hub name, as in diffusers (None: the Hub's "
                            "own, under $HF_HOME). medaug's latent cache is --latent_cache_dir.")
    model.add_argument("--train_mode", choices=("lora", "full"), default="lora",
                       help="lora: LoRA on the UNet attention projections (pretrained bases); "
                            "full: train the whole UNet (from-scratch bases).")
    model.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    model.add_argument("--train_text_encoder", action="store_true",
                       help="Also put LoRA on the CLIP text encoder (text conditioning only).")
    model.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                       help="Training target; None: the base scheduler's.")
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs `pip install medaug[xformers]`); default is PyTorch SDPA.")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass (less memory, slower).")
    model.add_argument("--allow_tf32", action="store_true",
                       help="Allow TensorFloat-32 matrix products on Ampere and newer GPUs (faster); no effect on CPU.")
    model.add_argument("--mask_channels", action="store_true",
                       help="Condition the UNet on each row's mask: the mask, at latent resolution, becomes an extra "
                            "input channel (conv_in widened, new weights zero), so generated images show their "
                            "mask; generate with MedaugMaskPipeline / medaug generate --from_masks. Needs --train_mode "
                            "full and a mask for every row.")
    model.add_argument("--consistency_segmenter", default=None,
                       help="With --mask_channels: a segmenter folder (medaug evaluate's OUT/fidelity_segmenter, or "
                            "FidelitySegmenter.save) whose reading of the one-step clean estimate must match the mask "
                            "(a ControlNet++-style consistency loss). Use another seed than the one that scores.")
    model.add_argument("--consistency_weight", type=float, default=0.5, help="Weight of the consistency loss.")
    model.add_argument("--consistency_max_timestep", type=int, default=400,
                       help="The consistency loss counts samples below this timestep only (readable estimates).")

    data = parser.add_argument_group("data and conditioning")
    data.add_argument("--train_data_dir", default=None,
                      help="Dataset folder with metadata.csv/jsonl (required unless --dataset_name names one).")
    data.add_argument("--dataset_name", default=None,
                      help="diffusers' flag: here a local dataset folder, used as --train_data_dir (Hub datasets "
                           "are refused: export one to a folder first).")
    data.add_argument("--split", default="train", help="Which split to train on.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Square training size in pixels; None: the base UNet's sample size times the VAE's.")
    data.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad", help="How images become square.")
    data.add_argument("--center_crop", action="store_true", help="diffusers' flag: the same as --fit crop.")
    data.add_argument("--random_flip", action="store_true", help="Flip latents horizontally at random.")
    data.add_argument("--conditioning", choices=tuple(CONDITION_KINDS), default="text",
                      help="What each image is conditioned on.")
    data.add_argument("--caption_column", default="text", help="Prompt column for --conditioning text.")
    data.add_argument("--reference_column", default=None,
                      help="Column naming a reference image for --conditioning clip_image; None: the row's image.")
    data.add_argument("--image_encoder_name_or_path", default=None,
                      help="CLIP vision model for clip_image; None: the base folder's image_encoder/.")
    data.add_argument("--embeddings_file", default=None,
                      help="Embeddings keyed by file_name (.safetensors, .npz, .parquet) for --conditioning embedding.")
    data.add_argument("--embedding_key_column", default="file_name", help="Key column of a parquet embeddings file.")
    data.add_argument("--embedding_value_column", default="embedding", help="Value column of a parquet file.")
    data.add_argument("--embedding_shape", type=parse_shape, default=None,
                      help="Reshape flat embeddings, e.g. 32,768 for ELIXR; None: as stored.")
    data.add_argument("--condition_tokens", type=int, default=4,
                      help="Tokens a vector condition (image embedding, (D,) embedding) is projected to.")
    data.add_argument("--condition_dropout", type=float, default=0.1,
                      help="Probability of replacing a condition by the unconditional embedding (for guidance).")
    data.add_argument("--latent_cache_dir", default=str(DEFAULT_CACHE_DIR),
                      help="Where latents and condition features are cached across runs ($MEDAUG_CACHE).")
    data.add_argument("--no_cache", action="store_true",
                      help="Encode images and conditions at every step, as a stock training loop does (slower; "
                           "for comparison and for data too large to cache).")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="medaug-finetune", help="The run folder to write.")
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
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
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
    add_refused_diffusers_flags(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "finetune")
    check_flags(args)
    return args


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, refused before any model is loaded; diffusers' spellings resolved."""
    args.train_data_dir = dataset_folder(args.train_data_dir, args.dataset_name)
    if args.center_crop:
        args.fit = "crop"
    check_base_flag(args.pretrained_model_name_or_path)
    kind = condition_class(args.conditioning)
    for name in kind.required_settings:
        if getattr(args, name, None) is None:
            raise ValueError(f"--{name} is required with --conditioning {args.conditioning}")
    if args.train_text_encoder and not kind.uses_text_encoder:
        raise ValueError(f"--train_text_encoder: --conditioning {args.conditioning} does not use the text encoder")
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}")
    check_xformers(args.enable_xformers_memory_efficient_attention)
    if args.consistency_segmenter and not args.mask_channels:
        raise ValueError("--consistency_segmenter compares generated images with their masks: it needs "
                         "--mask_channels")
    if args.mask_channels and args.train_mode != "full":
        raise ValueError("--mask_channels trains the widened first convolution with the rest of the UNet: use "
                         "--train_mode full")


# ---------------------------------------------------------------------------------------------------------
# Validation and saving
# ---------------------------------------------------------------------------------------------------------

def log_validation(args, step, condition, folder, vae, unet, text_encoder, tokenizer, resolution, accelerator):
    scheduler = validation_scheduler(args.pretrained_model_name_or_path, args.cache_dir)
    rows = validation_rows(folder, args.split, args.num_validation_images)
    hidden, negative = validation_embeddings(condition, folder, rows, accelerator.device, args.validation_prompt)
    masks = row_masks(folder, rows, resolution, args.fit) if args.mask_channels else None
    with accelerator.autocast():
        images = sample_images(vae, accelerator.unwrap_model(unet), scheduler, hidden, negative,
                               args.validation_inference_steps, args.validation_guidance_scale, resolution,
                               args.seed, text_encoder=text_encoder, tokenizer=tokenizer, masks=masks)
    if masks is not None:  # each mask above the image generated for it
        images = np.concatenate([np.repeat(masks.permute(0, 2, 3, 1).numpy(), 3, axis=3), images], axis=1)
    path = save_grid(images, Path(args.output_dir) / "validation" / f"step-{step:06d}.png")
    log_to_trackers(accelerator.trackers, images, step)
    logger.info("validation images: %s", path)
    return path


def save_outputs(args, accelerator, unet, text_encoder, condition, record: RunRecord):
    output_dir = Path(args.output_dir)
    unet = accelerator.unwrap_model(unet)
    if args.train_mode == "lora":
        save_lora(output_dir, unet, accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None)
    else:
        unet.save_pretrained(output_dir / "unet", safe_serialization=True)
    if condition.projection is not None:
        accelerator.unwrap_model(condition.projection).save_pretrained(output_dir / "condition_encoder",
                                                                       safe_serialization=True)
    write_run_record(output_dir, record)


def run_record(args, settings: dict, resolution: int, channels: int, scaling_factor: float, global_step: int,
               accelerator) -> RunRecord:
    """What this run's folder is, for generation and for the reader of its model card."""
    return RunRecord(
        base_model=args.pretrained_model_name_or_path, resolution=resolution, script="finetune",
        conditioning=args.conditioning, condition_settings=settings, unet_train_mode=args.train_mode,
        rank=args.rank if args.train_mode == "lora" else None, train_text_encoder=args.train_text_encoder,
        fit=args.fit, channels=channels, unet_mask_channels=1 if args.mask_channels else 0,
        prediction_type=args.prediction_type, vae_scaling_factor=scaling_factor,
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
        # Without an accelerator, say so: then several launched processes form a CPU (gloo) group instead
        # of each training alone.
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
    weight_dtype = frozen_weight_dtype(accelerator.mixed_precision, accelerator.device)

    # 1. Load the base model; check the data folder before anything slow.
    folder = DatasetFolder(args.train_data_dir)
    rows = training_rows(folder, args.split, args.max_train_samples)
    args.max_train_steps = train_steps(args.max_train_steps, args.num_train_epochs,
                                       epoch_steps(len(rows), args.train_batch_size, args.gradient_accumulation_steps,
                                                   accelerator.num_processes), DEFAULT_TRAIN_STEPS)
    channels = image_channels(folder, rows)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_base(args.pretrained_model_name_or_path,
                                                                    args.prediction_type, cache_dir=args.cache_dir)
    resolution = resolve_resolution(args.resolution, vae, unet)
    torch.manual_seed(args.seed)  # new projections start the same in every run of this seed
    kind = condition_class(args.conditioning)
    settings = kind.settings_from(vars(args))
    condition = kind.build(args.pretrained_model_name_or_path, unet.config.cross_attention_dim, tokenizer,
                           text_encoder, settings)
    inputs = condition.inputs(folder, rows)  # checks every row's prompt, reference image or embedding
    logger.info("attention: %s", choose_attention(args.enable_xformers_memory_efficient_attention,
                                                   accelerator.mixed_precision, accelerator.device, unet))
    vae.to(accelerator.device)  # the VAE stays fp32: it decodes to NaN in fp16 on some inputs
    text_encoder.to(accelerator.device, dtype=torch.float32 if args.train_text_encoder else weight_dtype)
    for frozen in condition.frozen_modules():
        frozen.to(accelerator.device, dtype=weight_dtype)

    # 2. Latents and condition features, cached across epochs and runs.
    cache = TensorCache(args.latent_cache_dir)
    dataset = pixel_dataset(folder, args.split, rows, resolution, args.fit)
    latents = None if args.no_cache else cached_latents(vae, Path(args.pretrained_model_name_or_path) / "vae",
                                                        dataset, args.fit, cache, accelerator)
    # A text encoder that trains changes its features every step: nothing to cache then.
    features = (None if args.no_cache or args.train_text_encoder
                else cached_features(condition, inputs, cache, accelerator))
    masks, consistency = (), None  # per-row latent masks (and full-size ones for the consistency loss)
    if args.mask_channels:
        folder.require_filled("mask_file_name", rows, "the column is missing; --mask_channels needs a mask per row",
                              "--mask_channels needs this row's mask; it is empty")
        full_masks = row_masks(folder, rows, resolution, args.fit)
        masks = (latent_masks(full_masks, resolution // vae_downsampling(vae)), full_masks)
    if args.consistency_segmenter:
        segmenter = FidelitySegmenter.load(args.consistency_segmenter, accelerator.device)
        consistency = MaskConsistencyLoss(segmenter, vae, noise_scheduler, args.consistency_weight,
                                          args.consistency_max_timestep)
    resume_path = (resolve_checkpoint(output_dir, args.resume_from_checkpoint)
                   if args.resume_from_checkpoint else None)

    # 3. What trains: LoRA or the whole UNet, the text encoder's LoRA, the condition projection.
    torch.manual_seed(args.seed + 1)
    if args.mask_channels:
        widen_conv_in(unet, 1)
    if args.train_mode == "lora":
        unet.to(accelerator.device, dtype=weight_dtype)  # frozen under the adapters (which train in fp32)
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
                model_latents, batch_masks = batch_latents(latents, vae, dataset, indices.cpu(), generator,
                                                           scaling_factor, args.random_flip, accelerator.device,
                                                           paired=masks)
                model_latents = model_latents.to(weight_dtype)
                hidden = batch_hidden_states(condition, features, inputs, indices.cpu(), generator,
                                             accelerator.device, weight_dtype, args.condition_dropout,
                                             encode_with_grad=args.train_text_encoder)
                def predict(noisy, timesteps, hidden_states):
                    if masks:  # the mask enters as extra input channels
                        noisy = torch.cat([noisy, batch_masks[0].to(noisy.dtype)], dim=1)
                    return unet(noisy, timesteps, hidden_states).sample

                def consistency_loss(noisy, timesteps, prediction):
                    return consistency(noisy, timesteps, prediction, batch_masks[1])

                loss = diffusion_loss(predict, noise_scheduler, model_latents, hidden.to(weight_dtype), generator,
                                      args.noise_offset, args.snr_gamma,
                                      consistency_loss if consistency is not None else None)
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
        record = run_record(args, settings, resolution, channels, scaling_factor, global_step, accelerator)
        save_outputs(args, accelerator, unet, text_encoder, condition, record)
    accelerator.end_training()
    return {"global_step": global_step, "losses": losses, "computed": list(cache.computed),
            "resolution": resolution, "output_dir": str(output_dir), "train_seconds": train_seconds,
            "steps_per_second": (global_step - first_step) / train_seconds if train_seconds else 0.0}


if __name__ == "__main__":
    with reporting_errors():  # bad input: one `error:` line and exit status 2
        main(parse_args())
