#!/usr/bin/env python
"""Train a convolutional VAE that generates images, from scratch on a dataset folder: a generator far cheaper than
diffusion, unconditional or conditioned on each row's class or mask.

    python train_scripts/train_autoencoder.py --train_data_dir ../shared/datasets/busi --resolution 64 \
        --condition mask --max_train_steps 3000 --output_dir outputs/busi-autoencoder

The encoder maps an image to a Gaussian over a latent vector, the decoder maps a vector back to the image; the
loss is the squared error plus `--kl_weight` x KL to N(0, I), so that decoding vectors drawn from N(0, I) gives new
images. `--condition` (medaug.models.generators): `none`; `class`, a learned embedding of the `label` column read
by both halves (class-conditional samples, e.g. for `medaug bench cls --arms synthetic`); `mask`, the mask read by
both halves at every scale, so each image is drawn for a mask and carries it (a segmentation study's pairs).

Phases: 1 data (every training row's image, and its mask or class, fitted to the square and held in memory; a
missing mask or label is refused by row and column), 2 the model and its optimizer, 3 resume, 4 train (random
flips; randomness drawn from the seed and the step, so a resumed run repeats the uninterrupted one), 5 save:
`autoencoder/` (`ConvVAE.from_pretrained`, safetensors), the run record `medaug_args.json` (generator
`autoencoder`) with a model card, `logs/losses.jsonl`, `checkpoint-N/`, `validation/`.

Generate with `medaug generate --model_dir RUN --output_dir SYNTHETIC` and, by `--condition`: `mask`,
`--from_masks DATASET_DIR` (one image per mask, carrying it); `class`, `--from_images DATASET_DIR` or nothing
(the run's own training rows): each image is drawn for its source row's `label`; `none`, the same sources, each
row only naming the provenance (the image carries neither its mask nor its label).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medaug.console import reporting_errors
from medaug.data import DatasetFolder
from medaug.models.autoencoder import ConvVAE, vae_loss
from medaug.models.generators import CONDITIONS, check_resolution, parse_channels
from medaug.models.training_data import (generator_run_record, load_training_tensors, log_validation,
                                         training_batch)
from medaug.run_record import write_run_record
from medaug.speed import choose_threads
from medaug.training.arguments import (HelpFormatter, add_config_flag, dataset_folder, epoch_steps, parse_with_config,
                                       positive_int, set_tf32, train_steps)
from medaug.training.checkpoint import load_checkpoint, prune_checkpoints, resolve_checkpoint, save_checkpoint
from medaug.training.data_order import EpochPermutationSampler, step_generator
from medaug.training.latents import image_channels, training_rows
from medaug.training.loss_log import LOSS_HISTORY, LossHistory
from medaug.training.run_folder import claimed_run_folder

logger = logging.getLogger("medaug.autoencoder")
# Arguments that define what a checkpoint holds: resuming with any of them changed is refused.
CONFIGURATION_KEYS = ("resolution", "train_batch_size", "seed", "generator_channels", "latent_dim", "kl_weight",
                      "condition", "fit")
DEFAULT_TRAIN_STEPS = 3000
WEIGHTS_FOLDER = "autoencoder"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_config_flag(parser)
    parser.add_argument("--train_data_dir", default=None,
                        help="Dataset folder (required unless --dataset_name names one).")
    parser.add_argument("--dataset_name", default=None,
                        help="diffusers' flag: here a local dataset folder, used as --train_data_dir.")
    parser.add_argument("--split", default="train", help="Which split to train on.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
    parser.add_argument("--condition", choices=CONDITIONS, default="none",
                        help="What the images are drawn for besides noise: nothing, the row's class (label column) "
                             "or its mask (mask_file_name).")
    parser.add_argument("--resolution", type=int, default=64, help="Square training and generation size (px).")
    parser.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad", help="How images become square.")
    parser.add_argument("--center_crop", action="store_true", help="diffusers' flag: the same as --fit crop.")
    parser.add_argument("--output_dir", default="medaug-autoencoder", help="The run folder to write.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the run already in --output_dir (its weights, record, logs, checkpoints).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initial weights, data order and noise.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Images per step.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"Steps; None: --num_train_epochs passes, else {DEFAULT_TRAIN_STEPS}.")
    parser.add_argument("--num_train_epochs", type=positive_int, default=None,
                        help="Passes over the training images, used when --max_train_steps is not given.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate.")
    parser.add_argument("--latent_dim", type=positive_int, default=64, help="Size of the latent vector.")
    parser.add_argument("--kl_weight", type=float, default=0.1,
                        help="Weight of KL to N(0, I) against the summed squared error (lower: sharper "
                             "reconstructions, samples further from the training images' look).")
    parser.add_argument("--generator_channels", default="256,128,64,32",
                        help="Channels of the decoder's blocks (each doubles the size; the encoder mirrors them).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images (and masks) left-right at random.")
    parser.add_argument("--allow_tf32", action="store_true",
                        help="Allow TensorFloat-32 matrix products on Ampere and newer GPUs (faster); none on CPU.")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None,
                        help="Keep at most this many checkpoints (the newest); None: all.")
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    parser.add_argument("--validation_steps", type=int, default=None,
                        help="Save a grid of generated images (below their masks) every N steps.")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Images per validation grid.")
    parser.add_argument("--device", default=None, help="cpu or cuda; None: cuda if present.")
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "train_autoencoder")
    args.train_data_dir = dataset_folder(args.train_data_dir, args.dataset_name)
    if args.center_crop:
        args.fit = "crop"
    args.generator_channels = parse_channels(args.generator_channels)
    check_resolution(args.resolution, args.generator_channels)
    return args


# ---------------------------------------------------------------------------------------------------------
# 4. One step
# ---------------------------------------------------------------------------------------------------------

def train_step(model, optimizer, images, masks, classes, noise, kl_weight: float) -> dict:
    reconstruction, mean, log_variance = model(images, masks, classes, noise)
    losses = vae_loss(reconstruction, images, mean, log_variance, kl_weight)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {name: value.item() for name, value in losses.items()}


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    """Train, holding --output_dir from before the first step until the run is saved."""
    with claimed_run_folder(args.output_dir, args.resume_from_checkpoint, args.overwrite):
        return train(args)


def train(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_tf32(args.allow_tf32)
    logger.info("torch threads %d (%s)", *choose_threads())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(args.output_dir)

    # 1. Data: every image (with its mask or class) checked and held in memory.
    folder = DatasetFolder(args.train_data_dir)
    rows = training_rows(folder, args.split, args.max_train_samples)
    args.max_train_steps = train_steps(args.max_train_steps, args.num_train_epochs,
                                       epoch_steps(len(rows), args.train_batch_size), DEFAULT_TRAIN_STEPS)
    channels = image_channels(folder, rows)
    data = load_training_tensors(folder, args.split, rows, args.resolution, channels, args.fit, args.condition)

    # 2. The model and its optimizer.
    torch.manual_seed(args.seed)
    model = ConvVAE(image_channels=channels, resolution=args.resolution, channels=tuple(args.generator_channels),
                    latent_dim=args.latent_dim, condition=args.condition,
                    class_names=tuple(data.class_names)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    modules = {"autoencoder": model}

    # 3. Resume.
    configuration = {key: getattr(args, key) for key in CONFIGURATION_KEYS} | {"channels": channels,
                                                                               "class_names": data.class_names}
    global_step = 0
    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None:
        global_step = load_checkpoint(resume, modules, optimizer, lr_scheduler, configuration)
        logger.info("resumed from %s at step %d", resume, global_step)

    # 4. Train.
    sampler = EpochPermutationSampler(len(rows), args.seed)
    steps_per_epoch = max(1, len(rows) // args.train_batch_size)
    history = LossHistory(output_dir / LOSS_HISTORY, global_step)
    losses, started, first_step = [], time.perf_counter(), global_step
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="autoencoder steps")
    while global_step < args.max_train_steps:
        epoch, done = divmod(global_step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for position in range(done, steps_per_epoch):
            indices = order[position * args.train_batch_size:(position + 1) * args.train_batch_size]
            generator = step_generator(args.seed, global_step)
            images, masks, classes = training_batch(data, indices, generator, args.random_flip, device)
            noise = torch.randn((len(indices), args.latent_dim), generator=generator)
            step = train_step(model, optimizer, images, masks, classes, noise, args.kl_weight)
            lr_scheduler.step()
            global_step += 1
            losses.append(step["loss"])
            history.log(global_step, **step)
            progress.update(1)
            progress.set_postfix(mse=f"{step['mse']:.4f}", kl=f"{step['kl']:.1f}")
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(output_dir / f"checkpoint-{global_step}", global_step, modules, optimizer,
                                lr_scheduler, configuration)
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0:
                log_validation(args, global_step, model, folder, data.class_names)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    seconds = time.perf_counter() - started

    # 5. Save the run folder.
    model.save_pretrained(output_dir / WEIGHTS_FOLDER, safe_serialization=True)
    write_run_record(output_dir, generator_run_record(args, "autoencoder", channels, data.class_names, global_step))
    return {"global_step": global_step, "losses": losses, "output_dir": str(output_dir), "train_seconds": seconds,
            "steps_per_second": (global_step - first_step) / seconds if seconds else 0.0}


if __name__ == "__main__":
    with reporting_errors():  # bad input: one `error:` line and exit status 2
        main(parse_args())
