"""Model construction: from-scratch Stable Diffusion folders and their offline tokenizer."""

from medaug.models.init_model import PRESETS, Preset, init_model
from medaug.models.tokenizer import build_tokenizer

__all__ = ["PRESETS", "Preset", "build_tokenizer", "init_model"]
