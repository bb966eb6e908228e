#!/usr/bin/env python
"""Train the VAE of a from-scratch base (from `medaug init-model`) on a dataset folder.

    python train_scripts/train_vae.py --pretrained_model_name_or_path outputs/base-small \
        --train_data_dir ../shared/datasets/busi --resolution 128 --max_train_steps 2000

Loss: L1 reconstruction + SSIM (MONAI's SSIMLoss; no downloaded perceptual network needed) + a small KL
term. Afterwards the latents' spread sets `scaling_factor`, the VAE is written back into the base folder's
`vae/` (or --output_dir), and reconstruction PSNR/SSIM on the test split are reported before and after
training (`vae_eval.json` beside the weights). finetune.py then uses the new VAE unchanged; its latent
cache notices the new weights and re-encodes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medaug.console import reporting_errors
from medaug.data import DatasetFolder, MedicalImageDataset
from medaug.outputs import output_lock, writable_folder
from medaug.speed import choose_threads
from medaug.training.arguments import (HelpFormatter, add_config_flag, dataset_folder, epoch_steps, parse_with_config,
                                       positive_int, set_tf32, train_steps)
from medaug.training.base_model import vae_downsampling
from medaug.training.run_folder import first_process
from medaug.training.checkpoint import (load_checkpoint, prune_checkpoints, resolve_checkpoint,
                                        save_checkpoint)
from medaug.training.data_order import EpochPermutationSampler, step_generator
from medaug.training.loss_log import LOSS_HISTORY, LossHistory

logger = logging.getLogger("medaug.train_vae")
DEFAULT_TRAIN_STEPS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_config_flag(parser)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Local base folder with vae/.")
    parser.add_argument("--train_data_dir", default=None,
                        help="Dataset folder with metadata.csv/jsonl (required unless --dataset_name names one).")
    parser.add_argument("--dataset_name", default=None,
                        help="diffusers' flag: here a local dataset folder, used as --train_data_dir.")
    parser.add_argument("--output_dir", default=None,
                        help="Where to write the trained VAE; None: back into the base folder's vae/.")
    parser.add_argument("--resolution", type=int, default=None, help="Square training size; None: the VAE's "
                                                                     "sample_size.")
    parser.add_argument("--fit", choices=("pad", "crop", "stretch"), default="pad", help="How images become square.")
    parser.add_argument("--center_crop", action="store_true", help="diffusers' flag: the same as --fit crop.")
    parser.add_argument("--train_batch_size", type=int, default=8, help="Images per step.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"Steps; None: --num_train_epochs passes, else {DEFAULT_TRAIN_STEPS}.")
    parser.add_argument("--num_train_epochs", type=positive_int, default=None,
                        help="Passes over the training split, used when --max_train_steps is not given.")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="AdamW learning rate.")
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the KL term.")
    parser.add_argument("--ssim_weight", type=float, default=0.2, help="Weight of the SSIM loss beside L1.")
    parser.add_argument("--allow_tf32", action="store_true",
                        help="Allow TensorFloat-32 matrix products on Ampere and newer GPUs (faster); none on CPU.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data order and sampling noise.")
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=2,
                        help="Keep at most this many checkpoints (the newest).")
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    parser.add_argument("--checkpoint_dir", default=None, help="Where checkpoints go; None: <base>/vae_checkpoints.")
    parser.add_argument("--max_eval_images", type=int, default=None,
                        help="Evaluate on the first N test images; None: all.")
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), input_args, "train_vae")
    args.train_data_dir = dataset_folder(args.train_data_dir, args.dataset_name)
    if args.center_crop:
        args.fit = "crop"
    base = Path(args.pretrained_model_name_or_path)
    if not (base / "vae" / "config.json").is_file():
        raise ValueError(f"--pretrained_model_name_or_path: {base} has no vae/ folder (a local base is needed: the "
                         "trained VAE is written back into it)")
    return args


def reconstruction_loss(vae, pixels, generator, kl_weight, ssim_weight, ssim_loss):
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    decoded = vae.decode(latents).sample
    l1 = F.l1_loss(decoded, pixels)
    ssim = ssim_loss((decoded.clamp(-1, 1) + 1) / 2, (pixels + 1) / 2)
    kl = posterior.kl().mean() / np.prod(latents.shape[1:])
    return l1 + ssim_weight * ssim + kl_weight * kl


@torch.no_grad()
def evaluate(vae, dataset, batch_size: int = 8) -> dict:
    """PSNR (dB) and SSIM of posterior-mean reconstructions, in [0, 1] pixel units, per image."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0, reduction="none"), SSIMMetric(spatial_dims=2, data_range=1.0,
                                                                         reduction="none")
    values = {"psnr": [], "ssim": []}
    for start in range(0, len(dataset), batch_size):
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        original, restored = (pixels + 1) / 2, (decoded + 1) / 2
        values["psnr"] += psnr(restored, original).flatten().tolist()
        values["ssim"] += ssim(restored, original).flatten().tolist()
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for name, v in values.items()}


@torch.no_grad()
def latent_scaling_factor(vae, dataset, batch_size: int = 8) -> float:
    """1 / std of posterior-mean latents over the training images, so scaled latents have unit spread."""
    latents = [vae.encode(torch.stack([dataset[i]["pixel_values"]
                                       for i in range(s, min(s + batch_size, len(dataset)))])).latent_dist.mean
               for s in range(0, len(dataset), batch_size)]
    return float(1.0 / torch.cat(latents).std())


def main(args: argparse.Namespace) -> dict:
    """Train, holding the base folder (which the VAE is written back into by default) and checking the output
    and checkpoint folders are writable before the first step."""
    base = Path(args.pretrained_model_name_or_path)
    writable_folder(args.output_dir or base / "vae", "--output_dir")
    writable_folder(args.checkpoint_dir or base / "vae_checkpoints", "--checkpoint_dir")
    with output_lock(base, "--pretrained_model_name_or_path", enabled=first_process()):
        return train(args)


def train(args: argparse.Namespace) -> dict:
    from diffusers import AutoencoderKL
    from monai.losses import SSIMLoss

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_tf32(args.allow_tf32)
    logger.info("torch threads %d (%s)", *choose_threads())
    base = Path(args.pretrained_model_name_or_path)
    output_dir = Path(args.output_dir) if args.output_dir else base / "vae"
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else base / "vae_checkpoints"

    # 1. Load the VAE and the data (checked before training).
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)
    resolution = args.resolution or vae.config.sample_size
    scale = vae_downsampling(vae)
    if resolution % scale:
        raise ValueError(f"--resolution {resolution}: must be a multiple of {scale}, the VAE's downsampling")
    folder = DatasetFolder(args.train_data_dir)
    train = MedicalImageDataset(folder, split="train", resolution=resolution, channels=3, fit=args.fit)
    test = MedicalImageDataset(folder, split="test", resolution=resolution, channels=3, fit=args.fit, validate=False)
    if args.max_eval_images:
        test.indices = test.indices[: args.max_eval_images]
    before = evaluate(vae.eval(), test)
    args.max_train_steps = train_steps(args.max_train_steps, args.num_train_epochs,
                                       epoch_steps(len(train), args.train_batch_size), DEFAULT_TRAIN_STEPS)

    # 2. Optimizer, data order, resume.
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sampler = EpochPermutationSampler(len(train), args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.train_batch_size, sampler=sampler,
                                         drop_last=len(train) >= args.train_batch_size)
    configuration = {"base": str(base.resolve()), "resolution": resolution, "train_batch_size": args.train_batch_size,
                     "seed": args.seed}
    global_step = 0
    resume = resolve_checkpoint(checkpoint_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if resume is not None:
        global_step = load_checkpoint(resume, {"vae": vae}, optimizer, lr_scheduler, configuration)

    # 3. Train.
    ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0)
    losses = []
    history = LossHistory(checkpoint_dir / LOSS_HISTORY, global_step)
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="vae steps")
    while global_step < args.max_train_steps:
        epoch, done = divmod(global_step, len(loader))
        sampler.set_epoch(epoch)
        for position, batch in enumerate(loader):
            if position < done:
                continue  # resumed mid-epoch: these batches were already seen
            generator = step_generator(args.seed, global_step)
            loss = reconstruction_loss(vae, batch["pixel_values"], generator, args.kl_weight, args.ssim_weight,
                                       ssim_loss)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            global_step += 1
            losses.append(loss.item())
            history.log(global_step, loss=loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(checkpoint_dir / f"checkpoint-{global_step}", global_step, {"vae": vae}, optimizer,
                                lr_scheduler, configuration)
                prune_checkpoints(checkpoint_dir, args.checkpoints_total_limit)
            if global_step >= args.max_train_steps:
                break
        done = 0
    progress.close()

    # 4. Scale, save, report.
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, train))
    after = evaluate(vae, test)
    vae.save_pretrained(output_dir, safe_serialization=True)
    report = {"resolution": resolution, "steps": global_step, "scaling_factor": vae.config.scaling_factor,
              "test_images": after["psnr"]["n"], "before_training": before, "after_training": after,
              "loss_history": str(history.path)}
    (output_dir / "vae_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("test reconstruction: PSNR %.2f -> %.2f dB, SSIM %.3f -> %.3f (n=%d); VAE written to %s",
                before["psnr"]["mean"], after["psnr"]["mean"], before["ssim"]["mean"], after["ssim"]["mean"],
                after["psnr"]["n"], output_dir)
    return report | {"losses": losses}


if __name__ == "__main__":
    with reporting_errors():  # bad input: one `error:` line and exit status 2
        main(parse_args())
