"""Downstream MONAI benchmarks: real vs real+synthetic vs synthetic-only (installed as `medaug.segmentation`)."""
