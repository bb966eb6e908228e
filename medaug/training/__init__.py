"""Pieces the training scripts share: caches, checkpoints, LoRA I/O, data order, validation images."""
