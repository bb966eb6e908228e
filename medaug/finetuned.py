"""Loading a medaug output folder (finetune.py or train_controlnet.py): the base model with the run's LoRA or
UNet, its condition projection, its ControlNet. Everything needed is in the folder (`medaug_args.json` names the
base model). `medaug.pipelines` and `medaug generate` load through `load_components`; nothing else does."""

from __future__ import annotations

import json
from pathlib import Path

from medaug.conditioning import ConditionProjection, load_projection
from medaug.training.lora import LORA_WEIGHTS_NAME

# Sampling schedulers by the short names `medaug generate --scheduler` takes; each is built from the base
# model's scheduler config, so its noise schedule (betas, prediction type) is the one the model learned.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


def read_run_args(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "medaug_args.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a medaug output folder (no medaug_args.json)")
    return json.loads(path.read_text())


def make_scheduler(name: str, config):
    """The scheduler `name` (a key of SCHEDULERS) built from a base scheduler's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler: unknown scheduler '{name}'; expected one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


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


def load_controlnet(model_dir: str | Path):
    """The run's `controlnet/` as a diffusers ControlNetModel, or None when the folder has none."""
    from diffusers import ControlNetModel

    path = Path(model_dir) / "controlnet"
    if not (path / "config.json").is_file():
        return None
    return ControlNetModel.from_pretrained(path)


def load_components(model_dir: str | Path, scheduler=None, fuse_lora: bool = True) -> tuple[dict, dict]:
    """The modules of an output folder, by the names medaug's pipelines register, and the run's arguments.

    `scheduler`: None (the base's), a name of SCHEDULERS, or a diffusers scheduler. With `fuse_lora` the LoRA is
    merged into the weights (faster sampling; adapter scales can no longer be changed). The image encoder is
    kept only for clip_image runs, and is the run's --image_encoder_name_or_path where it gave one.
    """
    pipeline, projection, run = load_finetuned(model_dir)
    if fuse_lora and (Path(model_dir) / LORA_WEIGHTS_NAME).is_file():
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()  # after fusing, the merged weights stay
    if isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    image_encoder, feature_extractor = None, None
    if run["conditioning"] == "clip_image":
        image_encoder, feature_extractor = _image_encoder(pipeline, run)
    if run["conditioning"] != "text" and projection is None:
        raise FileNotFoundError(f"{model_dir}: a {run['conditioning']} run needs condition_encoder/, which is missing")
    components = {
        "vae": pipeline.vae, "text_encoder": pipeline.text_encoder, "tokenizer": pipeline.tokenizer,
        "unet": pipeline.unet, "scheduler": scheduler or pipeline.scheduler, "condition_encoder": projection,
        "image_encoder": image_encoder, "feature_extractor": feature_extractor,
        "controlnet": load_controlnet(model_dir),
    }
    return components, run


def _image_encoder(pipeline, run: dict):
    from medaug.embeddings import load_vision_model

    if run.get("image_encoder_name_or_path"):
        return load_vision_model(run["image_encoder_name_or_path"])
    if pipeline.image_encoder is None:
        raise FileNotFoundError(f"{run['base_model']}: the base has no image_encoder/, which clip_image runs need")
    return pipeline.image_encoder, pipeline.feature_extractor
