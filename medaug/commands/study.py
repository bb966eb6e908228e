"""`medaug study seg`: real vs real+synthetic at scarce real fractions, each generator trained on its subset only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medaug.console import console, fail, print_table
from medaug.outputs import output_lock
from medaug.training.arguments import COMMAND_CONFIG_HELP, config_callback

study_app = typer.Typer(help="Low-data studies: does synthetic data help when labels are scarce?",
                        no_args_is_help=True)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{flag}: comma-separated numbers, got '{text}'")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@study_app.command("seg")
def study_seg_command(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder with masks and train/val/test splits.")],
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Study folder: subsets, generators, synthetic "
                                             "pairs, runs, summary.json, results.md, report.html. Running again "
                                             "resumes.")],
    real_fractions: Annotated[str, typer.Option("--real_fractions", help="Fractions of the training split, "
                                                "nested and stratified, by patient where patient_id exists.")] =
        "0.1,0.25,1",
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Seeds per arm (default 3).")] = None,
    subset_draws: Annotated[Optional[int], typer.Option(
        "--subset_draws", min=1, help="Independent stratified subsets per fraction, each with generators of its own "
        "(draw d uses subset seed d); differences pair by draw, seed and test image (default 1).")] = None,
    generators: Annotated[str, typer.Option("--generators", help="Comma-separated: mask_channels, controlnet, "
                                            "pix2pix, autoencoder, gan.")] = "mask_channels,pix2pix",
    arms: Annotated[str, typer.Option("--arms", help="Comma-separated: real, real+classical, real+synthetic, "
                                      "real+classical+synthetic, synthetic_pretrain, synthetic (synthetic pairs "
                                      "only: train on synthetic, test on real).")] =
        "real,real+classical,real+synthetic,real+classical+synthetic,synthetic_pretrain",
    synthetic_ratio: Annotated[Optional[float], typer.Option("--synthetic_ratio", help="Synthetic pairs per real "
                                                             "training image (default 1).")] = None,
    mask_augment: Annotated[bool, typer.Option("--mask_augment", help="Generate for new mask shapes (affine and "
                                               "elastic deformation, flips, combined lesions) made from the "
                                               "subset's masks.")] = False,
    filter_rule: Annotated[Optional[str], typer.Option("--filter", help="Keep pairs whose Dice (a segmenter "
                                                       "trained on the subset, on the image against its mask) is "
                                                       "at least this (0.5), or drop a quantile (q0.25).")] = None,
    unlabelled_images: Annotated[str, typer.Option("--unlabelled_images", help="labelled: the diffusion base "
                                                   "learns from the subset only; all: its VAE and UNet also learn "
                                                   "from every training image without masks.")] = "labelled",
    seg_steps: Annotated[Optional[int], typer.Option("--seg_steps", min=2, help="Optimiser steps of every arm "
                                                     "(default 1500).")] = None,
    seg_resolution: Annotated[Optional[int], typer.Option("--seg_resolution", min=16, help="Side in px the "
                                                          "segmenter trains and is scored at (default 128).")] = None,
    diffusion_steps: Annotated[Optional[int], typer.Option("--diffusion_steps", min=1, help="mask_channels "
                                                           "training steps (default 1000).")] = None,
    pix2pix_steps: Annotated[Optional[int], typer.Option("--pix2pix_steps", min=1, help="pix2pix training steps "
                                                         "(default 2000).")] = None,
    autoencoder_steps: Annotated[Optional[int], typer.Option("--autoencoder_steps", min=1, help="autoencoder "
                                                             "training steps (default 2000).")] = None,
    gan_steps: Annotated[Optional[int], typer.Option("--gan_steps", min=1, help="gan training steps (default "
                                                     "2000).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Every stage, tiny (tiny models, a few steps, one seed): "
                                        "checks the chain in minutes, measures nothing.")] = False,
    config: Annotated[Optional[Path], typer.Option(
        "--config", is_eager=True, callback=config_callback, help=COMMAND_CONFIG_HELP)] = None,
) -> None:
    """Train every generator on each real subset only, generate (optionally new mask shapes, optionally filtered by
    label fidelity), train the segmentation arms at equal optimiser steps, and report Dice with paired CIs."""
    from medaug.lowdata.study import LowDataStudyError, run_lowdata_study, settings_from_flags

    settings = settings_from_flags(
        quick, real_fractions=_floats(real_fractions, "--real_fractions"), seeds=seeds, subset_draws=subset_draws,
        generators=_names(generators), arms=_names(arms), synthetic_ratio=synthetic_ratio, mask_augment=mask_augment,
        filter=filter_rule, unlabelled_images=unlabelled_images, seg_steps=seg_steps, seg_resolution=seg_resolution,
        diffusion_steps=diffusion_steps, pix2pix_steps=pix2pix_steps, autoencoder_steps=autoencoder_steps,
        gan_steps=gan_steps)
    try:
        with output_lock(output_dir):
            summary = run_lowdata_study(data, output_dir, settings, on_stage=lambda text: console.rule(text))
    except (LowDataStudyError, FileExistsError, FileNotFoundError) as error:
        fail(str(error))
    rows = [[f"{row['real_fraction']:g}", row["arm"], row["generator"] or "–", f"{row['mean']:.3f}",
             f"{row['delta_vs_real']['mean']:+.3f} ± {row['delta_vs_real']['resolvable']:.3f}"
             if row["delta_vs_real"] else "–"] for row in summary["rows"]]
    print_table("test Dice (Δ vs real ± the smallest difference the design resolves)",
                ["fraction", "arm", "generator"], ["Dice", "Δ vs real"], rows)
    console.print(f"report: {output_dir / 'report.html'}")
