"""`medaug evaluate`: flags in, one call to `medaug.metrics.evaluate.evaluate`, a summary out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from medaug.console import console, fail, progress_bar
from medaug.outputs import output_lock

PATH_FLAGS = {"inception": "--inception_weights", "hf": "--model_path", "encoder": "--encoder_dir"}


def choose_extractor(features: str | None, paths: dict[str, Path | None]) -> str:
    """The extractor named by --features, or the one whose path flag alone was given."""
    if features is not None:
        if features not in PATH_FLAGS:
            fail(f"--features: unknown extractor '{features}'; expected one of {', '.join(PATH_FLAGS)}")
        if paths[features] is None:
            fail(f"--features {features} needs {PATH_FLAGS[features]}")
        return features
    given = [name for name, path in paths.items() if path is not None]
    if len(given) != 1:
        fail("--features: choose one extractor: --features inception --inception_weights FILE, "
             "--features hf --model_path DIR, or --features encoder --encoder_dir DIR "
             "(make an encoder with `medaug train-encoder`)")
    return given[0]


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_command(
    real: Annotated[Path, typer.Option("--real", help="Real dataset folder (metadata.csv).")],
    synthetic: Annotated[Path, typer.Option("--synthetic", help="Synthetic folder (metadata.csv, manifest.jsonl), "
                                            "or another real folder for a real-vs-real floor.")],
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder for metrics.json, report.html, pca.png.")],
    features: Annotated[Optional[str], typer.Option(
        "--features", help="Feature extractor: inception, hf or encoder (default: the one whose path is "
        "given).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(
        "--inception_weights", help="FID Inception-v3 weights (pt_inception-2015-12-05 .pth or .safetensors).")] = None,
    model_path: Annotated[Optional[Path], typer.Option(
        "--model_path", help="Local Hugging Face vision model folder (CLIP vision, DINOv2, ...).")] = None,
    encoder_dir: Annotated[Optional[Path], typer.Option(
        "--encoder_dir", help="Domain encoder folder written by `medaug train-encoder`.")] = None,
    real_split: Annotated[str, typer.Option("--real_split", help="Split of --real to compare with; also the "
                                            "training images of the memorisation audit.")] = "train",
    synthetic_split: Annotated[Optional[str], typer.Option(
        "--synthetic_split", help="Split of --synthetic to use (default: every row).")] = None,
    fit: Annotated[str, typer.Option("--fit", help="How images become square for inception/hf: pad, crop or "
                                     "stretch (an encoder uses its own).")] = "pad",
    nearest_k: Annotated[int, typer.Option("--nearest_k", min=1, help="k of precision/recall/density/coverage.")] = 5,
    kid_subsets: Annotated[int, typer.Option("--kid_subsets", min=1, help="Random subsets KID averages over.")] = 100,
    kid_subset_size: Annotated[int, typer.Option("--kid_subset_size", min=2, help="Images per KID subset "
                                                 "(capped at the smaller set).")] = 1000,
    diversity_pairs: Annotated[int, typer.Option("--diversity_pairs", min=1, help="Random image pairs for "
                                                 "MS-SSIM diversity.")] = 100,
    memorisation_space: Annotated[str, typer.Option(
        "--memorisation_space", help="pixels (standardised thumbnails) or features.")] = "pixels",
    memorisation_threshold: Annotated[float, typer.Option(
        "--copy_threshold", help="Memorisation audit: flag a synthetic image whose nearest-real distance is "
        "below this fraction of the typical real-to-real distance.")] = 0.5,
    max_images: Annotated[Optional[int], typer.Option(
        "--max_images", min=2, help="Use a seeded random subset of at most this many images per set.")] = None,
    save_features: Annotated[bool, typer.Option("--save_features", help="Also write features.npz "
                                                "(arrays real, synthetic).")] = False,
    batch_size: Annotated[int, typer.Option("--batch_size", min=1, help="Images per feature batch.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed for KID subsets, MS-SSIM pairs and grids.")] = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present).")] = None,
    fidelity_segmenter: Annotated[Optional[Path], typer.Option(
        "--fidelity_segmenter", help="Label fidelity: a segmenter saved by an earlier run (OUT/fidelity_segmenter); "
        "default: train one on the real train split.")] = None,
    fidelity_epochs: Annotated[int, typer.Option(
        "--fidelity_epochs", min=1, help="Epochs of the label-fidelity segmenter trained here.")] = 30,
    fidelity_resolution: Annotated[int, typer.Option(
        "--fidelity_resolution", min=16, help="Square size (px) the fidelity segmenter reads images at.")] = 64,
) -> None:
    """Compare synthetic images with real ones: Fréchet distance, KID, precision/recall/density/coverage,
    MS-SSIM diversity, a memorisation audit, a PCA plot and, where the synthetic images have masks, label fidelity
    (does each image show its mask to a segmenter trained on real images?), in OUT/report.html and
    OUT/metrics.json."""
    from medaug.data import DatasetError, ImageReadError
    from medaug.metrics.evaluate import FidelityOptions, evaluate
    from medaug.metrics.features import ExtractorError, build_extractor
    from medaug.metrics.imagesets import ImageSetError, open_image_set

    name = choose_extractor(features, {"inception": inception_weights, "hf": model_path, "encoder": encoder_dir})
    if fit not in ("pad", "crop", "stretch"):
        fail(f"--fit: unknown mode '{fit}'; expected pad, crop or stretch")
    sets = {}
    for flag, folder, split in (("--real", real, real_split), ("--synthetic", synthetic, synthetic_split)):
        try:
            sets[flag] = open_image_set(folder, split, flag, max_images, seed)
        except DatasetError as error:
            fail(f"{flag}: {error}")
    try:
        extractor = build_extractor(name, inception_weights, model_path, encoder_dir, fit, _device(device))
        with output_lock(output_dir), progress_bar("evaluate") as bar:
            tasks: dict[str, int] = {}

            def advance(step: str, count: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = bar.add_task(step, total=total)
                bar.advance(tasks[step], count)

            results = evaluate(sets["--real"], sets["--synthetic"], extractor, output_dir, nearest_k=nearest_k,
                               kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                               diversity_pairs=diversity_pairs, memorisation_space=memorisation_space,
                               memorisation_threshold=memorisation_threshold, save_features=save_features,
                               seed=seed, batch_size=batch_size, progress=advance,
                               fidelity=FidelityOptions(fidelity_segmenter, fidelity_epochs, fidelity_resolution,
                                                        _device(device)))
    except (ExtractorError, ImageSetError, ImageReadError, DatasetError, FileNotFoundError) as error:
        fail(str(error))
    except ValueError as error:  # a metric's own precondition (e.g. --memorisation_space)
        fail(str(error))
    print_summary(results, output_dir)


def print_summary(results: dict, output_dir: Path) -> None:
    from medaug.report_numbers import kid_text, mean_spread, plain

    features = results["features"]
    metrics, floor = features["metrics"], features["real_floor"]
    table = Table(title=f"extractor {features['extractor']} ({features['source']})")
    table.add_column("metric")
    table.add_column("synthetic vs real", justify="right")
    table.add_column("real vs real (floor)", justify="right")
    beside = (lambda key: "–") if "skipped" in floor else (lambda key: plain(floor[key], 3))
    table.add_row("Fréchet distance", plain(metrics["frechet_distance"], 3), beside("frechet_distance"))
    table.add_row("KID", kid_text(metrics["kid_mean"], metrics["kid_std"]),
                  "–" if "skipped" in floor else kid_text(floor["kid_mean"], floor["kid_std"]))
    for key in ("precision", "recall", "density", "coverage"):
        table.add_row(key, plain(metrics[key], 3), beside(key))
    diversity = results["diversity"]
    table.add_row("MS-SSIM within a set (pixels; lower: more diverse)",
                  mean_spread(diversity["synthetic"]["ms_ssim_mean"], diversity["synthetic"]["ms_ssim_std"]),
                  mean_spread(diversity["real"]["ms_ssim_mean"], diversity["real"]["ms_ssim_std"]))
    memorisation = results["memorisation"]
    table.add_row(f"near-copies ({memorisation['space']})",
                  f"{memorisation['flagged_count']} of {results['synthetic']['images']}", "")
    fidelity = results["label_fidelity"]
    if "skipped" in fidelity:
        table.add_row("label fidelity", f"not scored: {fidelity['skipped']}", "")
    else:
        table.add_row("label fidelity: synthetic / real Dice (ratio)",
                      f"{fidelity['synthetic_dice']:.3f} / {fidelity['real_dice']:.3f} ({fidelity['ratio']:.2f})", "")
        table.add_row("pairs above Dice 0.5", f"{fidelity['share_above_0_5']:.1%} of {fidelity['pairs']}", "")
    console.print(table)
    console.print(f"preprocessing: {features['preprocessing']}", highlight=False)
    console.print(f"report: {output_dir / 'report.html'}; numbers: {output_dir / 'metrics.json'}")
