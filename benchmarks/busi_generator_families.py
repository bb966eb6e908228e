#!/usr/bin/env python
"""The generator families on BUSI at one real fraction: autoencoder, GAN, pix2pix and latent diffusion (mask channels).

    python benchmarks/busi_generator_families.py --output_dir /tmp/medaug-families      # about an hour on 2 cores
    python benchmarks/busi_generator_families.py --quick --output_dir /tmp/families-q  # minutes, measures nothing

1. `medaug study seg` at --real_fraction (default 0.25) with the four mask-conditioned generators, each trained on
   the subset only, pairs generated for new mask shapes (as the published study), and three arms per generator:
   `real` (the subset alone), `real+synthetic` (as many synthetic pairs as real images) and `synthetic` (synthetic
   pairs only: train on synthetic, test on real). Test Dice on BUSI's 156 real test images, over --seeds seeds.
2. A domain encoder (`medaug train-encoder`'s SimCLR ResNet) trained on BUSI train only, and the Fréchet distance in
   its space from each generator's pairs (a seeded sample of the test split's size) to BUSI test, beside the
   real-vs-real floor (a sample of BUSI train of the same size against BUSI test).

The study folder resumes; the record (JSON) holds every row, the distances, the settings, the wall time and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("mask_channels", "pix2pix", "autoencoder", "gan")
ARMS = ("real", "real+synthetic", "synthetic")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "busi")
    parser.add_argument("--output_dir", type=Path, default=Path("/tmp/medaug-benchmarks/busi-generator-families"))
    parser.add_argument("--real_fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--generators", default=",".join(FAMILIES))
    parser.add_argument("--encoder_steps", type=int, default=300, help="SimCLR steps of the domain encoder.")
    parser.add_argument("--encoder_resolution", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="Tiny everything: checks the chain, measures nothing.")
    parser.add_argument("--record", type=Path, default=None, help="JSON to write (default: OUTPUT_DIR/benchmark.json)")
    return parser.parse_args(argv)


def run_study(options) -> dict:
    from medaug.lowdata.study import run_lowdata_study, settings_from_flags

    settings = settings_from_flags(options.quick, real_fractions=(options.real_fraction,),
                                   seeds=None if options.quick else options.seeds,
                                   generators=tuple(options.generators.split(",")), arms=ARMS, mask_augment=True)
    return run_lowdata_study(options.data, options.output_dir, settings, on_stage=lambda text: print(f"== {text}"))


def domain_encoder(options) -> Path:
    from medaug.metrics.encoder import load_training_images, train_encoder

    encoder_dir = options.output_dir / "encoder"
    if not (encoder_dir / "config.json").is_file():
        images = load_training_images(options.data, "train", 1, options.encoder_resolution, "pad", None)
        train_encoder(images, encoder_dir, max_train_steps=2 if options.quick else options.encoder_steps,
                      train_batch_size=16 if options.quick else 64, seed=0)
    return encoder_dir


def frechet_distances(options, encoder_dir: Path, generators: list[str]) -> dict:
    """Each generator's pairs and a real train sample, the test split's size each, against BUSI test."""
    from medaug.lowdata.subsets import subset_name
    from medaug.metrics.distances import frechet_distance
    from medaug.metrics.features import encoder_extractor, extract_features
    from medaug.metrics.imagesets import open_image_set

    extractor = encoder_extractor(encoder_dir)
    test_set = open_image_set(options.data, "test", "--real")
    test = extract_features(extractor, test_set)
    size = len(test_set)
    train = extract_features(extractor, open_image_set(options.data, "train", "--real", max_images=size, seed=0))
    distances = {"real_vs_real_floor": frechet_distance(train, test), "images_per_set": size}
    for generator in generators:
        folder = options.output_dir / "synthetic" / subset_name(options.real_fraction) / generator
        pairs = open_image_set(folder, None, "--synthetic", max_images=size, seed=0)
        distances[generator] = frechet_distance(extract_features(extractor, pairs), test)
    return distances


def print_table(summary: dict, distances: dict) -> None:
    rows = {(row["arm"], row["generator"]): row for row in summary["rows"]}
    real = rows[("real", None)]
    print(f"real only: Dice {real['mean']:.3f} [{real['ci_low']:.3f}, {real['ci_high']:.3f}], {real['n_real']} images")
    print(f"Fréchet distance to BUSI test, real-vs-real floor {distances['real_vs_real_floor']:.2f} "
          f"({distances['images_per_set']} images per set)")
    print(f"{'generator':14} {'FD':>7} {'real+synthetic Dice':>22} {'Δ vs real':>22} {'synthetic only (TSTR)':>22}")
    for generator in (name for name in FAMILIES if name in distances):
        mixed, alone = rows[("real+synthetic", generator)], rows[("synthetic", generator)]
        delta = mixed["delta_vs_real"]
        print(f"{generator:14} {distances[generator]:7.2f} {mixed['mean']:8.3f} [{mixed['ci_low']:.3f}, "
              f"{mixed['ci_high']:.3f}] {delta['mean']:+8.3f} [{delta['ci_low']:+.3f}, {delta['ci_high']:+.3f}] "
              f"{alone['mean']:8.3f} [{alone['ci_low']:.3f}, {alone['ci_high']:.3f}]")


def main(argv=None) -> dict:
    options = parse_args(argv)
    started = time.perf_counter()
    summary = run_study(options)
    distances = frechet_distances(options, domain_encoder(options), options.generators.split(","))
    record = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "wall_seconds": time.perf_counter() - started, "options": {
                  key: str(value) for key, value in vars(options).items()},
              "rows": summary["rows"], "generators": summary["generators"], "frechet_distance": distances}
    path = options.record or options.output_dir / "benchmark.json"
    path.write_text(json.dumps(record, indent=1))
    print_table(summary, distances)
    print(f"wall {record['wall_seconds'] / 60:.1f} min; written {path}")
    return record


if __name__ == "__main__":
    main()
