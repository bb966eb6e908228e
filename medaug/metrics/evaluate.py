"""`medaug evaluate`: compare a synthetic folder with a real one and write metrics.json and report.html.

One run uses one feature extractor; every number that comes from features is stored under that
extractor's description, so numbers from different extractors are never put side by side. MS-SSIM works
on pixels and the memorisation audit on standardised pixel thumbnails (or on the features, if asked), and
each says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medaug.data import read_manifest
from medaug.files import write_text_atomic
from medaug.metrics.distances import (
    FRECHET_MIN_IMAGES,
    KID_MIN_IMAGES,
    frechet_distance,
    kernel_inception_distance,
    prdc,
)
from medaug.metrics.diversity import MS_SSIM_MIN_IMAGES, ms_ssim_diversity
from medaug.metrics.features import Extractor, extract_features
from medaug.metrics.imagesets import ImageSet, check_same_channels, load_all, require_images
from medaug.metrics.memorisation import AUDIT_RESOLUTION, DEFAULT_THRESHOLD, memorisation_audit, thumbnail_vectors
from medaug.metrics.pca import plot_pca
from medaug.outputs import refuse_foreign_entries, refuse_input_folder

GRID_IMAGES = 16
THUMBNAIL_SIZE = 128
MEMORISATION_SPACES = ("pixels", "features")


def check_sizes(real: ImageSet, synthetic: ImageSet, nearest_k: int) -> None:
    """Raise before any work when a set is too small, saying how many images the neediest metric needs.

    Precision/recall/density/coverage need k neighbours besides the image itself (k + 1 >= 2 images); the
    Fréchet distance, KID, MS-SSIM and the memorisation audit need 2, so k + 1 covers them all.
    """
    needed = max(nearest_k + 1, FRECHET_MIN_IMAGES, KID_MIN_IMAGES, MS_SSIM_MIN_IMAGES)
    for image_set in (synthetic, real):
        require_images(image_set, needed, f"precision/recall/density/coverage with k={nearest_k}",
                       "lower --nearest_k or add images")


def feature_metrics(real: np.ndarray, synthetic: np.ndarray, nearest_k: int, kid_subsets: int,
                    kid_subset_size: int, seed: int) -> dict:
    """Every metric computed from features, for one pair of feature sets."""
    result = {"real_images": int(len(real)), "synthetic_images": int(len(synthetic)),
              "frechet_distance": frechet_distance(real, synthetic)}
    result.update(kernel_inception_distance(real, synthetic, kid_subsets, kid_subset_size, seed))
    result.update(prdc(real, synthetic, nearest_k))
    return result


def real_floor(real: np.ndarray, nearest_k: int, kid_subsets: int, kid_subset_size: int, seed: int) -> dict:
    """`feature_metrics` between two disjoint halves of the real set (a seeded split): what 'as good as real'
    scores. Each half holds half the images, and the Fréchet distance grows as sets shrink, so this floor sits a
    little above what two real sets of the full size would score."""
    half = len(real) // 2
    needed = nearest_k + 1
    if half < needed:
        return {"skipped": f"needs at least {2 * needed} real images for two halves of {needed} (k={nearest_k}), "
                           f"found {len(real)}"}
    order = np.random.default_rng([seed, 2]).permutation(len(real))
    floor = feature_metrics(real[order[:half]], real[order[half:2 * half]], nearest_k, kid_subsets, kid_subset_size,
                            seed)
    floor["description"] = (f"the same metrics between two disjoint random halves of the real set ({half} images "
                            f"each, split seed {seed}); 'synthetic' here is the second half")
    return floor


def per_label_metrics(real: np.ndarray, synthetic: np.ndarray, real_labels: list[str], synthetic_labels: list[str],
                      nearest_k: int, kid_subsets: int, kid_subset_size: int, seed: int) -> dict:
    """`feature_metrics` for each label both sets hold; a label too small says how many it needs."""
    results = {}
    needed = nearest_k + 1
    for label in sorted(set(real_labels) & set(synthetic_labels) - {""}):
        real_rows = [i for i, value in enumerate(real_labels) if value == label]
        synthetic_rows = [i for i, value in enumerate(synthetic_labels) if value == label]
        if min(len(real_rows), len(synthetic_rows)) < needed:
            results[label] = {"real_images": len(real_rows), "synthetic_images": len(synthetic_rows),
                              "skipped": f"needs at least {needed} images per set (k={nearest_k})"}
            continue
        results[label] = feature_metrics(real[real_rows], synthetic[synthetic_rows], nearest_k, kid_subsets,
                                         kid_subset_size, seed)
    return results


def audit(real: ImageSet, synthetic: ImageSet, channels: int, space: str, threshold: float,
          real_features: np.ndarray, synthetic_features: np.ndarray, fit: str) -> dict:
    """The memorisation audit with its near-copies as (synthetic, nearest real) file pairs."""
    if space == "pixels":
        real_vectors = thumbnail_vectors(load_all(real, channels, AUDIT_RESOLUTION, fit))
        synthetic_vectors = thumbnail_vectors(load_all(synthetic, channels, AUDIT_RESOLUTION, fit))
        description = (f"standardised grey thumbnails, {fit} to {AUDIT_RESOLUTION}x{AUDIT_RESOLUTION} px "
                       "(distance sqrt(2(1 - correlation)))")
    else:
        real_vectors, synthetic_vectors = real_features, synthetic_features
        description = "Euclidean distance between the extractor's features"
    result = memorisation_audit(real_vectors, synthetic_vectors, threshold)
    real_files, synthetic_files = real.file_names, synthetic.file_names
    ratios = result["ratios"]
    return {
        "space": space,
        "description": description,
        "reference": real.describe(),
        "threshold": result["threshold"],
        "real_scale": result["real_scale"],
        "ratio_min": float(ratios.min()),
        "ratio_median": float(np.median(ratios)),
        "flagged_count": int(len(result["flagged"])),
        "flagged_fraction": float(len(result["flagged"]) / len(ratios)),
        "near_copies": [_pair(i, result, real_files, synthetic_files) for i in result["flagged"]],
        "per_image": [_pair(i, result, real_files, synthetic_files) for i in range(len(ratios))],
    }


def _pair(position: int, result: dict, real_files: list[str], synthetic_files: list[str]) -> dict:
    nearest = int(result["nearest"][position])
    return {"synthetic": synthetic_files[position], "synthetic_position": int(position),
            "nearest_real": real_files[nearest], "real_position": nearest,
            "ratio": float(result["ratios"][position])}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medaug")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def _set_summary(image_set: ImageSet, flag: str) -> dict:
    labels = image_set.labels
    counts = {label: labels.count(label) for label in sorted(set(labels)) if label}
    summary = {"flag": flag, "folder": str(image_set.root), "split": image_set.split or "all rows",
               "images": len(image_set), "labels": counts}
    models = sorted({entry.model_dir for entry in read_manifest(image_set.root) if entry.model_dir})
    if models:  # a synthetic folder says which model folders made it
        summary["generated_by"] = models
    return summary


@dataclass
class FidelityOptions:
    """How label fidelity is scored: a saved segmenter, or one trained on the real train split."""

    segmenter_dir: str | Path | None = None
    epochs: int = 30
    resolution: int = 64
    device: str = "cpu"


def fidelity_results(real: ImageSet, synthetic: ImageSet, channels: int, output_dir: Path, options: FidelityOptions,
                     seed: int) -> tuple[dict, str]:
    """label_fidelity for metrics.json (each pair's Dice also written into the synthetic manifest) and its report
    section; skipped, saying why, when either set has no masks."""
    from medaug.metrics.fidelity import (FidelitySegmenter, label_fidelity, plot_fidelity, record_in_manifest,
                                         train_fidelity_segmenter, worst_pair_views)
    from medaug.report import fidelity_section

    reason = _no_masks(synthetic, "synthetic") or (None if options.segmenter_dir else _no_masks(real, "real"))
    if reason:
        return {"skipped": reason}, fidelity_section({"skipped": reason}, None, [])
    if options.segmenter_dir:
        segmenter = FidelitySegmenter.load(options.segmenter_dir, options.device)
    else:
        segmenter = train_fidelity_segmenter(real.root, options.resolution, options.epochs, seed,
                                             channels=channels, fit="pad", device=options.device)
        segmenter.save(output_dir / "fidelity_segmenter")
    fidelity = label_fidelity(segmenter, synthetic.root, synthetic.indices)
    fidelity["manifest_lines_updated"] = record_in_manifest(synthetic.root, fidelity["per_pair"])
    figure = plot_fidelity(output_dir / "fidelity.png", fidelity, segmenter.info.per_real_image)
    worst = worst_pair_views(segmenter, synthetic.root, fidelity["per_pair"])
    return fidelity, fidelity_section(fidelity, figure, worst)


def _no_masks(image_set: ImageSet, name: str) -> str | None:
    folder = image_set.folder
    if not folder.has_column("mask_file_name") or not any(folder.value(i, "mask_file_name") for i in image_set.indices):
        return f"the {name} images have no masks"
    return None


# What evaluate writes in its folder: a rerun replaces these; anything else there is the user's and refused.
EVALUATE_ENTRIES = ("metrics.json", "report.html", "pca.png", "features.npz", "fidelity.png", "fidelity_segmenter")


def evaluate(real: ImageSet, synthetic: ImageSet, extractor: Extractor, output_dir: str | Path,
             nearest_k: int = 5, kid_subsets: int = 100, kid_subset_size: int = 1000, diversity_pairs: int = 100,
             memorisation_space: str = "pixels", memorisation_threshold: float = DEFAULT_THRESHOLD,
             save_features: bool = False, seed: int = 0, batch_size: int = 32,
             progress: Callable[[str, int, int], None] | None = None,
             fidelity: FidelityOptions | None = None) -> dict:
    """Compute every metric, write `metrics.json`, `pca.png`, `report.html` (and `features.npz`); return the results."""
    from medaug.report import write_report

    if memorisation_space not in MEMORISATION_SPACES:
        raise ValueError(f"--memorisation_space must be one of {MEMORISATION_SPACES}, got '{memorisation_space}'")
    check_sizes(real, synthetic, nearest_k)
    channels = check_same_channels(real, synthetic)
    output_dir = Path(output_dir)
    refuse_input_folder(output_dir, {"--real": real.root, "--synthetic": synthetic.root})
    refuse_foreign_entries(output_dir, "medaug evaluate", lambda entry: entry.name in EVALUATE_ENTRIES)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def step(name: str, total: int) -> Callable[[int], None] | None:
        return None if progress is None else (lambda n: progress(name, n, total))

    real_features = extract_features(extractor, real, batch_size, step("real features", len(real)))
    synthetic_features = extract_features(extractor, synthetic, batch_size,
                                          step("synthetic features", len(synthetic)))
    kid = dict(nearest_k=nearest_k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "medaug_version": _version(),
        "real": _set_summary(real, real.flag),
        "synthetic": _set_summary(synthetic, synthetic.flag),
        "channels": channels,
        "features": {**extractor.describe(), "dimensions": int(real_features.shape[1]),
                     "metrics": feature_metrics(real_features, synthetic_features, **kid),
                     "real_floor": real_floor(real_features, **kid),
                     "per_label": per_label_metrics(real_features, synthetic_features, real.labels,
                                                    synthetic.labels, **kid)},
        "diversity": {
            "description": f"MONAI MS-SSIM between random pairs of images of one set, {extractor.fit} to "
                           "192x192 px, data range 1 (lower: more diverse)",
            "synthetic": ms_ssim_diversity(synthetic, channels, diversity_pairs, seed, extractor.fit),
            "real": ms_ssim_diversity(real, channels, diversity_pairs, seed, extractor.fit),
        },
        "memorisation": audit(real, synthetic, channels, memorisation_space, memorisation_threshold,
                              real_features, synthetic_features, extractor.fit),
    }
    results["label_fidelity"], fidelity_html = fidelity_results(real, synthetic, channels, output_dir,
                                                                fidelity or FidelityOptions(), seed)
    plot_pca(output_dir / "pca.png", real_features, synthetic_features, real.labels, synthetic.labels,
             title=f"PCA of {extractor.name} features ({extractor.source})")
    results["files"] = {"metrics": "metrics.json", "report": "report.html", "pca": "pca.png"}
    if "skipped" not in results["label_fidelity"]:
        results["files"]["fidelity"] = "fidelity.png"
    if save_features:
        _save_features(output_dir / "features.npz", real, synthetic, real_features, synthetic_features, extractor)
        results["files"]["features"] = "features.npz"
    results["seconds"] = round(time.time() - started, 1)
    write_text_atomic(output_dir / "metrics.json", json.dumps(results, indent=2, ensure_ascii=False))
    write_report(output_dir / "report.html", results, real, synthetic, channels, output_dir / "pca.png",
                 grid_images=GRID_IMAGES, thumbnail_size=THUMBNAIL_SIZE, seed=seed, fidelity_html=fidelity_html)
    return results


def _save_features(path: Path, real: ImageSet, synthetic: ImageSet, real_features: np.ndarray,
                   synthetic_features: np.ndarray, extractor: Extractor) -> None:
    """Features with their file names and labels; plain arrays only, so `np.load` needs no pickle."""
    np.savez(path, real=real_features, synthetic=synthetic_features,
             real_file_names=np.array(real.file_names, dtype=str),
             synthetic_file_names=np.array(synthetic.file_names, dtype=str),
             real_labels=np.array(real.labels, dtype=str), synthetic_labels=np.array(synthetic.labels, dtype=str),
             extractor=np.array(json.dumps(extractor.describe())))
