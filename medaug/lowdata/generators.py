"""The study's generators, each trained on one real subset's folder only, and the synthetic pairs they make.

- `mask_channels`: a from-scratch `small` latent diffusion base (VAE trained first), whose UNet reads the mask as an
  extra input channel, with the mask-consistency loss (`finetune.py --mask_channels --consistency_segmenter`): the
  best diffusion path in benchmarks/RESULTS.md, "Label fidelity".
- `controlnet`: a text fine-tune of the same base, then a ControlNet on the filled mask.
- `pix2pix`: a U-Net generator with a PatchGAN discriminator (`train_pix2pix.py`), no diffusion.
- `autoencoder`: a convolutional VAE whose decoder reads the mask at every scale (`train_autoencoder.py --condition
  mask`); `gan`: a DCGAN-style generator and discriminator that read the mask the same way (`train_gan.py
  --condition mask`). The baselines of the other generator families.

With `unlabelled="all"`, the base's VAE and its UNet (a text fine-tune without masks) learn from every training
image of the full dataset, as when a clinic has many images and few masks; whatever reads masks (the ControlNet,
the mask channels, the consistency segmenter, pix2pix) still sees only the subset.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from medaug.training.run_scripts import rerun_flags, run_script

GENERATORS = ("mask_channels", "controlnet", "pix2pix", "autoencoder", "gan")
# The generators trained from nothing by one script, with the settings field holding their steps.
SCRIPT_GENERATORS = {"pix2pix": ("train_pix2pix", "pix2pix_steps"), "autoencoder": ("train_autoencoder",
                                                                                  "autoencoder_steps"),
                     "gan": ("train_gan", "gan_steps")}
DONE_FILE = "medaug_args.json"  # every training script writes its run record last


@dataclass(frozen=True)
class GeneratorSettings:
    resolution: int = 64
    preset: str = "small"
    vae_steps: int = 150
    base_steps: int = 600  # text fine-tune: the ControlNet's starting point, or the unlabelled pre-training
    diffusion_steps: int = 1000  # mask_channels
    controlnet_steps: int = 1000
    pix2pix_steps: int = 2000
    autoencoder_steps: int = 2000
    gan_steps: int = 2000
    batch_size: int = 8
    consistency: bool = True
    segmenter_epochs: int = 30
    inference_steps: int = 20
    # The sampler the published study (benchmarks/RESULTS.md) ran with, kept so that its numbers reproduce;
    # `medaug generate` itself defaults to a faster one (medaug.speed).
    scheduler: str = "ddim"
    precision: str = "fp32"
    guidance_scale: float = 3.0
    seed: int = 0


def _finished(run_dir: Path) -> bool:
    return (run_dir / DONE_FILE).is_file()


def training_flags(settings: GeneratorSettings, data: Path, output_dir: Path, steps: int, cache: Path) -> list:
    """The flags finetune.py and train_controlnet.py share here (resuming from a checkpoint that is there)."""
    return ["--train_data_dir", data, "--resolution", settings.resolution, "--report_to", "none",
            "--seed", settings.seed, "--latent_cache_dir", cache, "--output_dir", output_dir, "--max_train_steps", steps,
            "--train_batch_size", settings.batch_size, "--checkpointing_steps", min(250, steps),
            "--checkpoints_total_limit", 1, *rerun_flags(output_dir)]


def prepare_base(work: Path, images: Path, settings: GeneratorSettings) -> Path:
    """A from-scratch base whose VAE learned from `images`' training split (kept once trained)."""
    from medaug.data import DatasetFolder
    from medaug.models import init_model

    base = work / "base"
    if (base / "vae" / "vae_eval.json").is_file():
        return base
    folder = DatasetFolder(images)
    prompts = sorted({folder.value(i, "text") for i in range(len(folder))} - {""}) if folder.has_column("text") \
        else None
    init_model(base, preset=settings.preset, prompts=prompts, seed=settings.seed, overwrite=True)
    run_script("train_vae", ["--pretrained_model_name_or_path", base, "--train_data_dir", images, "--resolution",
                             settings.resolution, "--max_train_steps", settings.vae_steps, "--train_batch_size",
                             settings.batch_size, "--learning_rate", 1e-3, "--seed", settings.seed])
    return base


def text_finetune(work: Path, base: Path, images: Path, settings: GeneratorSettings) -> Path:
    """The base's UNet fine-tuned in full on `images`' text prompts, no masks."""
    output_dir = work / "text_finetune"
    if not _finished(output_dir):
        run_script("finetune", ["--pretrained_model_name_or_path", base,
                                *training_flags(settings, images, output_dir, settings.base_steps, work / "cache"),
                                "--conditioning", "text", "--train_mode", "full", "--learning_rate", 3e-4])
    return output_dir


def pretrained_base(work: Path, images: Path, settings: GeneratorSettings) -> Path:
    """A base folder whose UNet was pre-trained on every image of `images` without masks."""
    folder = work / "pretrained_base"
    if (folder / "unet").is_dir() and (folder / "model_index.json").is_file():
        return folder
    base = prepare_base(work, images, settings)
    tuned = text_finetune(work, base, images, settings)
    partial = work / "pretrained_base.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(base, partial, ignore=shutil.ignore_patterns("vae_checkpoints"))
    shutil.rmtree(partial / "unet")
    shutil.copytree(tuned / "unet", partial / "unet")
    partial.rename(folder)
    return folder


def consistency_segmenter(work: Path, subset: Path, settings: GeneratorSettings) -> Path:
    """The segmenter the consistency loss asks: trained on the subset, another seed than the study's scorer."""
    from medaug.metrics.fidelity import SEGMENTER_CONFIG, train_fidelity_segmenter

    folder = work / "consistency_segmenter"
    if not (folder / SEGMENTER_CONFIG).is_file():
        train_fidelity_segmenter(subset, settings.resolution, settings.segmenter_epochs, settings.seed + 1).save(folder)
    return folder


def train_generator(name: str, subset: Path, work: Path, settings: GeneratorSettings,
                    unlabelled: Path | None = None) -> Path:
    """Train generator `name` on the subset folder (resuming an interrupted run) and return its run folder.
    `unlabelled`: a folder whose training images (not masks) the base may learn from; `work/..` holds that base."""
    if name not in GENERATORS:
        raise ValueError(f"--generators: unknown '{name}'; expected some of {', '.join(GENERATORS)}")
    output_dir = work / name
    if _finished(output_dir):
        return output_dir
    if name in SCRIPT_GENERATORS:
        script, steps = SCRIPT_GENERATORS[name]
        condition = [] if name == "pix2pix" else ["--condition", "mask"]  # pix2pix reads the mask by design
        run_script(script, ["--train_data_dir", subset, "--resolution", settings.resolution, "--seed", settings.seed,
                            "--output_dir", output_dir, "--max_train_steps", getattr(settings, steps),
                            "--train_batch_size", settings.batch_size, "--checkpointing_steps", 250,
                            "--checkpoints_total_limit", 1, "--random_flip", *condition, *rerun_flags(output_dir)])
        return output_dir
    shared, images = (work.parent / "unlabelled", unlabelled) if unlabelled is not None else (work, subset)
    base = prepare_base(shared, images, settings)
    cache = work / "cache"
    if name == "mask_channels":
        start = pretrained_base(shared, images, settings) if unlabelled is not None else base
        flags = ["--consistency_segmenter", consistency_segmenter(work, subset, settings)] \
            if settings.consistency else []
        run_script("finetune", ["--pretrained_model_name_or_path", start,
                                *training_flags(settings, subset, output_dir, settings.diffusion_steps, cache),
                                "--conditioning", "text", "--train_mode", "full", "--learning_rate", 3e-4,
                                "--mask_channels", *flags])
    else:
        run_script("train_controlnet", ["--lora_dir", text_finetune(shared, base, images, settings),
                                        *training_flags(settings, subset, output_dir, settings.controlnet_steps,
                                                         cache),
                                        "--edge_method", "mask_filled", "--controlnet_train_mode", "full",
                                        "--learning_rate", 3e-4])
    return output_dir


def generate_pairs(run_dir: Path, masks: Path, output_dir: Path, count: int, settings: GeneratorSettings) -> dict:
    """At least `count` synthetic pairs for the masks of `masks`' training rows (each mask used equally often)."""
    from medaug.data import DatasetFolder
    from medaug.generate import generate

    sources = len(DatasetFolder(masks).indices("train"))
    per_source = max(1, math.ceil(count / max(1, sources)))
    summary = generate(run_dir, output_dir, from_masks=masks, split="train", num_per_source=per_source,
                       num_inference_steps=settings.inference_steps, guidance_scale=settings.guidance_scale,
                       scheduler=settings.scheduler, precision=settings.precision, seed=settings.seed, batch_size=8,
                       resume=True)
    return {key: summary[key] for key in ("written", "skipped", "total", "seconds")}
