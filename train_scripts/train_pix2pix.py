#!/usr/bin/env python
"""Train pix2pix (mask -> image) on a dataset folder's (image, mask) pairs: the baseline generator whose images
follow their masks by construction, often the strongest one on a CPU budget.

    python train_scripts/train_pix2pix.py --train_data_dir ../shared/datasets/busi --resolution 64 \
        --max_train_steps 2000 --output_dir outputs/busi-pix2pix

A MONAI U-Net generator reads the mask and a noise channel; a PatchGAN discriminator judges (mask, image) pairs;
the generator's loss is least-squares GAN + `--l1_weight` x L1 to the real image (pix2pix's recipe). Phases: 1 data
(every training row's image and mask, fitted to the square, held in memory), 2 networks and one optimizer (the
discriminator and the generator step in turn, each with only its own gradients), 3 resume, 4 train (random flips of
image and mask together; randomness drawn from the seed and the step, so a resumed run repeats the uninterrupted
one), 5 save: `pix2pix/` (`Pix2PixGenerator.from_pretrained`), the run record `medaug_args.json` with a model card,
`logs/losses.jsonl`, `checkpoint-N/`, `validation/`. `medaug generate --from_masks` generates from the folder.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medaug.console import reporting_errors
from medaug.data import DatasetFolder, MedicalImageDataset
from medaug.models.pix2pix import PatchDiscriminator, Pix2PixGenerator
from medaug.run_record import RunRecord, write_run_record
from medaug.speed import choose_threads
from medaug.training.arguments import (HelpFormatter, add_config_flag, dataset_folder, epoch_steps, parse_with_config,
                                       positive_int, set_tf32, train_steps)
from medaug.training.checkpoint import (load_checkpoint, prune_checkpoints, resolve_checkpoint,
                                        save_checkpoint)
from medaug.training.data_order import EpochPermutationSampler, step_generator
from medaug.training.latents import image_channels, training_rows
from medaug.training.loss_log import LOSS_HISTORY, LossHistory
from medaug.training.run_folder import claimed_run_folder
from medaug.training.validation import save_grid

logger = logging.getLogger("medaug.pix2pix")
# Arguments that define what a checkpoint holds: resuming with any of them changed is refused.
CONFIGURATION_KEYS = ("resolution", "train_batch_size", "seed", "generator_channels", "l1_weight", "fit")
DEFAULT_TRAIN_STEPS = 2000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_config_flag(parser)
    parser.add_argument("--train_data_dir", default=None,
                        help="Dataset folder whose rows have masks (required unless --dataset_name names one).")
    parser.add_argument("--dataset_name", default=None,
                        help="diffusers' flag: here a local dataset folder, used as --train_data_dir.")
    parser.add_argument("--split", default="train", help="Which split to train on.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
    parser.add_argument("--resolution", type=int, default=64, help="Square training and generation size (px).")
    parser.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad", help="How images become square.")
    parser.add_argument("--center_crop", action="store_true", help="diffusers' flag: the same as --fit crop.")
    parser.add_argument("--output_dir", default="medaug-pix2pix", help="The run folder to write.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the run already in --output_dir (its weights, record, logs, checkpoints).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initial weights, data order and noise.")
    parser.add_argument("--train_batch_size", type=int, default=8, help="Pairs per step.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"Steps; None: --num_train_epochs passes, else {DEFAULT_TRAIN_STEPS}.")
    parser.add_argument("--num_train_epochs", type=positive_int, default=None,
                        help="Passes over the training pairs, used when --max_train_steps is not given.")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="Adam learning rate of both networks.")
    parser.add_argument("--adam_beta1", type=float, default=0.5, help="pix2pix's Adam beta1.")
    parser.add_argument("--l1_weight", type=float, default=100.0, help="Weight of L1 to the real image (pix2pix: 100).")
    parser.add_argument("--generator_channels", default="32,64,128,256",
                        help="Channels of the U-Net's levels (one halving between levels).")
    parser.add_argument("--random_flip", action="store_true", help="Flip image and mask together at random.")
    parser.add_argument("--allow_tf32", action="store_true",
                        help="Allow TensorFloat-32 matrix products on Ampere and newer GPUs (faster); none on CPU.")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None,
                        help="Keep at most this many checkpoints (the newest); None: all.")
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    parser.add_argument("--validation_steps", type=int, default=None, help="Save a grid of val masks and images "
                                                                            "every N steps.")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Masks (and images) per validation.")
    parser.add_argument("--device", default=None, help="cpu or cuda; None: cuda if present.")
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "train_pix2pix")
    args.train_data_dir = dataset_folder(args.train_data_dir, args.dataset_name)
    if args.center_crop:
        args.fit = "crop"
    try:
        args.generator_channels = [int(part) for part in str(args.generator_channels).split(",")]
    except ValueError:
        raise ValueError(f"--generator_channels: expected integers separated by commas, got "
                         f"{args.generator_channels!r}") from None
    multiple = 2 ** (len(args.generator_channels) - 1)
    if args.resolution % multiple:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of {multiple} for "
                         f"--generator_channels {args.generator_channels}")
    return args


# ---------------------------------------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------------------------------------

def load_pairs(folder: DatasetFolder, split: str, rows: list[int], resolution: int, channels: int, fit: str):
    """(images in [-1, 1], masks in {0, 1}) of `rows`, (N, C, R, R) and (N, 1, R, R); every file checked first."""
    folder.require_filled("mask_file_name", rows, "the column is missing; pix2pix learns from (image, mask) pairs",
                          "pix2pix needs this row's mask; it is empty")
    dataset = MedicalImageDataset(folder, split=split, resolution=resolution, channels=channels, fit=fit,
                                  with_masks=True)
    dataset.indices = rows
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["pixel_values"] for item in items]), torch.stack([item["mask"] for item in items])


def batch_pairs(images, masks, indices, generator, random_flip: bool, device):
    batch_images, batch_masks = images[indices].clone(), masks[indices].clone()
    if random_flip:
        flip = torch.rand(len(indices), generator=generator) < 0.5
        batch_images[flip], batch_masks[flip] = batch_images[flip].flip(-1), batch_masks[flip].flip(-1)
    noise = torch.randn((len(indices), 1, *masks.shape[2:]), generator=generator)
    return batch_images.to(device), batch_masks.to(device), noise.to(device)


# ---------------------------------------------------------------------------------------------------------
# 4. One step: the discriminator, then the generator
# ---------------------------------------------------------------------------------------------------------

def train_step(generator_net, discriminator, optimizer, images, masks, noise, l1_weight: float) -> dict:
    fake = generator_net(masks, noise)
    optimizer.zero_grad(set_to_none=True)
    real_logits, fake_logits = discriminator(masks, images), discriminator(masks, fake.detach())
    loss_d = 0.5 * (F.mse_loss(real_logits, torch.ones_like(real_logits))
                    + F.mse_loss(fake_logits, torch.zeros_like(fake_logits)))
    loss_d.backward()
    optimizer.step()  # only the discriminator has gradients here
    optimizer.zero_grad(set_to_none=True)
    judged = discriminator(masks, fake)
    adversarial = F.mse_loss(judged, torch.ones_like(judged))
    l1 = F.l1_loss(fake, images)
    loss_g = adversarial + l1_weight * l1
    loss_g.backward()
    for parameter in discriminator.parameters():
        parameter.grad = None  # the generator's loss must not move the discriminator
    optimizer.step()
    return {"loss": loss_g.item(), "loss_d": loss_d.item(), "l1": l1.item()}


# ---------------------------------------------------------------------------------------------------------
# 5. Validation and saving
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def log_validation(args, step, generator_net, folder, channels, resolution, device) -> Path:
    from medaug.training.conditions import validation_rows
    from medaug.training.mask_channels import row_masks

    rows = [i for i in validation_rows(folder, args.split, args.num_validation_images)
            if folder.path(i, "mask_file_name") is not None]
    masks = row_masks(folder, rows, resolution, args.fit).to(device)
    noise = torch.randn((len(rows), 1, resolution, resolution), generator=torch.Generator().manual_seed(args.seed))
    images = ((generator_net.eval()(masks, noise.to(device)) + 1) / 2).clamp(0, 1).cpu()
    generator_net.train()
    to_rgb = lambda tensor: np.repeat(tensor.permute(0, 2, 3, 1).numpy(), 3 // tensor.shape[1], axis=3)  # noqa: E731
    pairs = np.concatenate([to_rgb(masks.cpu()), to_rgb(images)], axis=1)  # each mask above its image
    return save_grid(pairs, Path(args.output_dir) / "validation" / f"step-{step:06d}.png")


def run_record(args, resolution: int, channels: int, global_step: int) -> RunRecord:
    return RunRecord(base_model="", resolution=resolution, script="train_pix2pix", conditioning="none",
                     unet_train_mode="none", fit=args.fit, channels=channels, generator="pix2pix",
                     train_data_dir=str(Path(args.train_data_dir).resolve()), split=args.split, steps=global_step,
                     seed=args.seed, mixed_precision="no", arguments=vars(args))  # always fp32


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> dict:
    """Train, holding --output_dir from before the first step until the run is saved (refused while another run
    writes there, or while it holds another run that is neither resumed nor overwritten)."""
    with claimed_run_folder(args.output_dir, args.resume_from_checkpoint, args.overwrite):
        return train(args)


def train(args: argparse.Namespace) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_tf32(args.allow_tf32)
    logger.info("torch threads %d (%s)", *choose_threads())
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(args.output_dir)

    # 1. Data: every pair checked and held in memory.
    folder = DatasetFolder(args.train_data_dir)
    rows = training_rows(folder, args.split, args.max_train_samples)
    args.max_train_steps = train_steps(args.max_train_steps, args.num_train_epochs,
                                       epoch_steps(len(rows), args.train_batch_size), DEFAULT_TRAIN_STEPS)
    channels = image_channels(folder, rows)
    images, masks = load_pairs(folder, args.split, rows, args.resolution, channels, args.fit)

    # 2. Networks and one optimizer for both (each step updates only the network that has gradients).
    torch.manual_seed(args.seed)
    generator_net = Pix2PixGenerator(out_channels=channels, channels=tuple(args.generator_channels)).to(device)
    discriminator = PatchDiscriminator(in_channels=1 + channels).to(device)
    optimizer = torch.optim.Adam([*generator_net.parameters(), *discriminator.parameters()], lr=args.learning_rate,
                                 betas=(args.adam_beta1, 0.999))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    modules = {"generator": generator_net, "discriminator": discriminator}

    # 3. Resume.
    configuration = {key: getattr(args, key) for key in CONFIGURATION_KEYS} | {"channels": channels}
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
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="pix2pix steps")
    while global_step < args.max_train_steps:
        epoch, done = divmod(global_step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for position in range(done, steps_per_epoch):
            indices = order[position * args.train_batch_size:(position + 1) * args.train_batch_size]
            batch = batch_pairs(images, masks, indices, step_generator(args.seed, global_step), args.random_flip,
                                device)
            step = train_step(generator_net, discriminator, optimizer, *batch, args.l1_weight)
            lr_scheduler.step()
            global_step += 1
            losses.append(step["loss"])
            history.log(global_step, **step)
            progress.update(1)
            progress.set_postfix(l1=f"{step['l1']:.3f}", d=f"{step['loss_d']:.3f}")
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(output_dir / f"checkpoint-{global_step}", global_step, modules, optimizer,
                                lr_scheduler, configuration)
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0:
                log_validation(args, global_step, generator_net, folder, channels, args.resolution, device)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    seconds = time.perf_counter() - started

    # 5. Save the run folder.
    generator_net.save_pretrained(output_dir / "pix2pix", safe_serialization=True)
    write_run_record(output_dir, run_record(args, args.resolution, channels, global_step))
    return {"global_step": global_step, "losses": losses, "output_dir": str(output_dir), "train_seconds": seconds,
            "steps_per_second": (global_step - first_step) / seconds if seconds else 0.0}


if __name__ == "__main__":
    with reporting_errors():  # bad input: one `error:` line and exit status 2
        main(parse_args())
