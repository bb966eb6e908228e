"""Loading a finetune.py output folder: the base pipeline with the run's LoRA or UNet, and its condition
projection. Everything needed is in the folder (`medaug_args.json` names the base model)."""

from __future__ import annotations

import json
from pathlib import Path

from medaug.conditioning import ConditionProjection, load_projection
from medaug.training.lora import LORA_WEIGHTS_NAME


def read_run_args(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "medaug_args.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a medaug output folder (no medaug_args.json)")
    return json.loads(path.read_text())


def load_finetuned(model_dir: str | Path):
    """(StableDiffusionPipeline with the run applied, ConditionProjection or None, the run's arguments)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model_dir = Path(model_dir)
    run = read_run_args(model_dir)
    pipeline = StableDiffusionPipeline.from_pretrained(run["base_model"], safety_checker=None,
                                                       requires_safety_checker=False)
    if (model_dir / "unet").is_dir():
        pipeline.unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    if (model_dir / LORA_WEIGHTS_NAME).is_file():
        pipeline.load_lora_weights(str(model_dir), weight_name=LORA_WEIGHTS_NAME)
    projection: ConditionProjection | None = None
    if (model_dir / "condition_encoder").is_dir():
        projection = load_projection(model_dir)
    return pipeline, projection, run
