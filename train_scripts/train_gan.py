#!/usr/bin/env python
"""Train a DCGAN-style GAN from scratch on a dataset folder: unconditional, conditioned on each row's class or
mask, and optionally semi-conditional on InfoGAN-like codes.

    python train_scripts/train_gan.py --train_data_dir ../shared/datasets/busi --resolution 64 \
        --condition class --max_train_steps 4000 --output_dir outputs/busi-gan
    python train_scripts/train_gan.py ... --code_distributions bernoulli,exponential,uniform --code_dims 5

The generator turns noise into an image through doubling blocks; the discriminator judges images with strided
convolutions; both learn by DCGAN's non-saturating logistic loss. `--condition` (medaug.models.generators): `none`;
`class`, a learned embedding of the `label` column in both networks (class-conditional samples, e.g. for
`medaug bench cls --arms synthetic`); `mask`, the mask read by the generator at every scale and by the discriminator
as an input channel, so each image is drawn for a mask and carries it.

Semi-conditional (`--code_distributions`, `--code_dims`): the generator also reads a code, one block of
`--code_dims` variables per named distribution (bernoulli, exponential, uniform; medaug.models.gan). The
discriminator's second head predicts an image's code, squashed onto each distribution's support, so it places
every image somewhere in those distributions; on real images `--code_prior_weight` x the gap between the
predictions' batch mean and variance and the distributions' keeps real images spread over them as the codes are.
`--info_weight` x the MSE between the drawn code and the head's prediction on the generated image ties the two:
the generator learns to show its code, the head to read it back.

Phases: 1 data (images, and masks or classes, held in memory; a missing mask or label is refused by row and
column), 2 networks and one optimizer (the discriminator and the generator step in turn, each with only its own
gradients), 3 resume, 4 train (randomness from the seed and the step, so a resumed run repeats the uninterrupted
one), 5 save: `gan/` (the generator, `GanGenerator.from_pretrained`, safetensors), the run record
`medaug_args.json` (generator `gan`) with a model card, `logs/losses.jsonl`, `checkpoint-N/` (both networks),
`validation/`.

Generate with `medaug generate --model_dir RUN --output_dir SYNTHETIC` and, by `--condition`: `mask`,
`--from_masks DATASET_DIR` (one image per mask, carrying it); `class`, `--from_images DATASET_DIR` or nothing (the
run's own training rows): each image is drawn for its source row's `label`; `none` (codes or not), the same
sources, each row only naming the provenance (the image carries neither its mask nor its label). Codes are drawn
from each image's seed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medaug.console import reporting_errors
from medaug.data import DatasetFolder
from medaug.models.gan import (GanDiscriminator, GanGenerator, check_code_dims, code_moments,
                               parse_code_distributions)
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

logger = logging.getLogger("medaug.gan")
# Arguments that define what a checkpoint holds: resuming with any of them changed is refused.
CONFIGURATION_KEYS = ("resolution", "train_batch_size", "seed", "generator_channels", "noise_dim", "condition",
                      "code_distributions", "code_dims", "info_weight", "code_prior_weight", "fit")
DEFAULT_TRAIN_STEPS = 4000
WEIGHTS_FOLDER = "gan"


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
    parser.add_argument("--code_distributions", default="",
                        help="Semi-conditional codes: distributions separated by commas (bernoulli, exponential, "
                             "uniform), each a block of --code_dims variables; empty: no codes.")
    parser.add_argument("--code_dims", type=int, default=5, help="Variables per code distribution.")
    parser.add_argument("--info_weight", type=float, default=1.0,
                        help="Weight of the MSE between a generated image's code and the discriminator's prediction.")
    parser.add_argument("--code_prior_weight", type=float, default=0.1,
                        help="Weight that keeps the code head's predictions on real images spread as the code "
                             "distributions are (batch mean and variance).")
    parser.add_argument("--resolution", type=int, default=64, help="Square training and generation size (px).")
    parser.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad", help="How images become square.")
    parser.add_argument("--center_crop", action="store_true", help="diffusers' flag: the same as --fit crop.")
    parser.add_argument("--output_dir", default="medaug-gan", help="The run folder to write.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the run already in --output_dir (its weights, record, logs, checkpoints).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initial weights, data order and noise.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Images per step.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"Steps; None: --num_train_epochs passes, else {DEFAULT_TRAIN_STEPS}.")
    parser.add_argument("--num_train_epochs", type=positive_int, default=None,
                        help="Passes over the training images, used when --max_train_steps is not given.")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="Adam learning rate of both networks.")
    parser.add_argument("--adam_beta1", type=float, default=0.5, help="DCGAN's Adam beta1.")
    parser.add_argument("--noise_dim", type=positive_int, default=64, help="Size of the generator's noise vector.")
    parser.add_argument("--generator_channels", default="256,128,64,32",
                        help="Channels of the generator's blocks (each doubles the size; the discriminator mirrors "
                             "them).")
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
    args = parse_with_config(build_parser(), input_args, "train_gan")
    args.train_data_dir = dataset_folder(args.train_data_dir, args.dataset_name)
    if args.center_crop:
        args.fit = "crop"
    args.generator_channels = parse_channels(args.generator_channels)
    check_resolution(args.resolution, args.generator_channels)
    args.code_distributions = parse_code_distributions(args.code_distributions)
    check_code_dims(args.code_dims, args.code_distributions)
    if not args.code_distributions:
        args.code_dims = 0
    return args


# ---------------------------------------------------------------------------------------------------------
# 4. One step: the discriminator (with its code head), then the generator
# ---------------------------------------------------------------------------------------------------------

def code_prior_gap(predicted: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """How far a batch of predicted codes is from the code distributions' mean and variance."""
    mean, variance = (moment.to(predicted.device) for moment in moments)
    return F.mse_loss(predicted.mean(0), mean) + F.mse_loss(predicted.var(0, unbiased=False), variance)


def train_step(generator_net, discriminator, optimizer, batch: dict, weights: dict, moments) -> dict:
    images, masks, classes, vectors = batch["images"], batch["masks"], batch["classes"], batch["vectors"]
    codes = vectors[:, generator_net.config.noise_dim:]
    fake = generator_net(vectors, masks, classes)
    optimizer.zero_grad(set_to_none=True)
    real_logits, real_codes = discriminator(images, masks, classes)
    fake_logits, fake_codes = discriminator(fake.detach(), masks, classes)
    loss_d = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()  # logistic loss, real 1 / fake 0
    info_d = F.mse_loss(fake_codes, codes) if fake_codes is not None else torch.zeros(())
    prior = code_prior_gap(real_codes, moments) if real_codes is not None else torch.zeros(())
    (loss_d + weights["info"] * info_d + weights["prior"] * prior).backward()
    optimizer.step()  # only the discriminator has gradients here
    optimizer.zero_grad(set_to_none=True)
    judged, judged_codes = discriminator(fake, masks, classes)
    adversarial = F.softplus(-judged).mean()  # non-saturating
    info = F.mse_loss(judged_codes, codes) if judged_codes is not None else torch.zeros(())
    (adversarial + weights["info"] * info).backward()
    for parameter in discriminator.parameters():
        parameter.grad = None  # the generator's loss must not move the discriminator
    optimizer.step()
    return {"loss": adversarial.item(), "loss_d": loss_d.item(), "info": info.item(), "code_prior": prior.item()}


def step_batch(data, indices: list[int], generator_net, generator: torch.Generator, random_flip: bool,
               device) -> dict:
    images, masks, classes = training_batch(data, indices, generator, random_flip, device)
    vectors = generator_net.draw_vectors(len(indices), generator)
    return {"images": images, "masks": masks, "classes": classes, "vectors": vectors}


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

    # 2. Networks and one optimizer for both (each step updates only the network that has gradients).
    torch.manual_seed(args.seed)
    shared = {"image_channels": channels, "resolution": args.resolution, "channels": tuple(args.generator_channels),
              "condition": args.condition, "code_distributions": tuple(args.code_distributions),
              "code_dims": args.code_dims}
    generator_net = GanGenerator(noise_dim=args.noise_dim, class_names=tuple(data.class_names), **shared).to(device)
    discriminator = GanDiscriminator(num_classes=len(data.class_names), **shared).to(device)
    optimizer = torch.optim.Adam([*generator_net.parameters(), *discriminator.parameters()], lr=args.learning_rate,
                                 betas=(args.adam_beta1, 0.999))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    modules = {"generator": generator_net, "discriminator": discriminator}
    weights = {"info": args.info_weight, "prior": args.code_prior_weight}
    moments = code_moments(args.code_distributions, args.code_dims)

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
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="gan steps")
    while global_step < args.max_train_steps:
        epoch, done = divmod(global_step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for position in range(done, steps_per_epoch):
            indices = order[position * args.train_batch_size:(position + 1) * args.train_batch_size]
            batch = step_batch(data, indices, generator_net, step_generator(args.seed, global_step), args.random_flip,
                               device)
            step = train_step(generator_net, discriminator, optimizer, batch, weights, moments)
            lr_scheduler.step()
            global_step += 1
            losses.append(step["loss"])
            history.log(global_step, **step)
            progress.update(1)
            progress.set_postfix(g=f"{step['loss']:.3f}", d=f"{step['loss_d']:.3f}")
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(output_dir / f"checkpoint-{global_step}", global_step, modules, optimizer,
                                lr_scheduler, configuration)
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0:
                log_validation(args, global_step, generator_net, folder, data.class_names)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    seconds = time.perf_counter() - started

    # 5. Save the run folder: the generator is all generation needs (the checkpoints keep the discriminator).
    generator_net.save_pretrained(output_dir / WEIGHTS_FOLDER, safe_serialization=True)
    write_run_record(output_dir, generator_run_record(args, "gan", channels, data.class_names, global_step))
    return {"global_step": global_step, "losses": losses, "output_dir": str(output_dir), "train_seconds": seconds,
            "steps_per_second": (global_step - first_step) / seconds if seconds else 0.0}


if __name__ == "__main__":
    with reporting_errors():  # bad input: one `error:` line and exit status 2
        main(parse_args())
