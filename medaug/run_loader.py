"""Loading a run folder's modules: the base model with the run's UNet, its condition modules, its ControlNet, and
its LoRA applied to a pipeline. `medaug.pipelines`, `medaug generate` and train_controlnet.py's `--lora_dir` all
load through here; what the folder is comes from its record (`medaug.run_record`)."""

from __future__ import annotations

from pathlib import Path

from medaug.conditioning import condition_class, load_projection
from medaug.run_record import RunRecord, RunRecordError, read_run_record
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


# The weights each non-diffusion generator family's run folder must hold.
GENERATOR_FILES = {"pix2pix": "pix2pix/config.json"}


def make_scheduler(name: str, config):
    """The scheduler `name` (a key of SCHEDULERS) built from a base scheduler's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler: unknown scheduler '{name}'; expected one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def base_scheduler(base: str):
    """The base's own scheduler, of the class its scheduler_config.json names."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(base, subfolder="scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


def check_run_files(model_dir: Path, record: RunRecord) -> None:
    """The weights the record says the folder holds are there: a run missing them would generate from the bare
    base and say nothing."""
    needed = {"full": "unet/config.json", "lora": LORA_WEIGHTS_NAME}.get(record.unet_train_mode)
    if needed and not (model_dir / needed).is_file():
        raise RunRecordError(f"{model_dir}: the run trained its UNet ({record.unet_train_mode}) but {needed} is "
                             "missing; the folder is incomplete (copy it again, or retrain)")
    weights = GENERATOR_FILES.get(record.generator)
    if weights and not (model_dir / weights).is_file():
        raise RunRecordError(f"{model_dir}: a {record.generator} run without {weights}; the folder is incomplete")
    if record.controlnet and not (model_dir / "controlnet" / "config.json").is_file():
        raise RunRecordError(f"{model_dir}: a ControlNet run without controlnet/; the folder is incomplete")


def load_run_components(model_dir: str | Path, scheduler=None, base_model: str | Path | None = None
                        ) -> tuple[dict, RunRecord]:
    """The modules of a run folder by the names medaug's pipelines register (LoRA not yet applied: see
    `apply_lora`), and its record.

    `scheduler`: None (the base's), a name of SCHEDULERS, or a diffusers scheduler. `base_model` overrides where
    the record says the base is.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    record = read_run_record(model_dir, base_model)
    check_run_files(model_dir, record)
    base = record.base_model
    full_unet = record.unet_train_mode == "full"
    own_scheduler = base_scheduler(base)
    components = {
        "vae": AutoencoderKL.from_pretrained(base, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        "unet": UNet2DConditionModel.from_pretrained(model_dir / "unet" if full_unet else base,
                                                     subfolder=None if full_unet else "unet"),
        "scheduler": make_scheduler(scheduler, own_scheduler.config) if isinstance(scheduler, str)
        else scheduler or own_scheduler,
        "condition_encoder": load_projection(model_dir) if (model_dir / "condition_encoder").is_dir() else None,
        "controlnet": ControlNetModel.from_pretrained(model_dir / "controlnet") if record.controlnet else None,
    }
    kind = condition_class(record.conditioning)
    components.update(kind.extra_components(base, record.condition_settings))
    missing = [name for name in kind.required_components if components.get(name) is None]
    if missing:
        raise FileNotFoundError(f"{model_dir}: a {record.conditioning} run needs {', '.join(missing)}, which is "
                                "missing (condition_encoder/ is written by the training script)")
    return components, record


def apply_lora(pipeline, model_dir: str | Path, fuse: bool = True) -> None:
    """Load the run's LoRA (UNet, and the text encoder's where trained) into a pipeline with diffusers' LoRA
    loader; `fuse` merges it into the weights (faster sampling; adapter scales are then fixed)."""
    if not (Path(model_dir) / LORA_WEIGHTS_NAME).is_file():
        return
    pipeline.load_lora_weights(str(model_dir), weight_name=LORA_WEIGHTS_NAME)
    if fuse:
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()  # after fusing, the merged weights stay


def apply_run_weights(model_dir: str | Path, tokenizer, text_encoder, vae, unet, scheduler):
    """(unet, text_encoder) of a base with a fine-tune run applied: its full UNet, or its LoRA fused in."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model_dir = Path(model_dir)
    record = read_run_record(model_dir)
    check_run_files(model_dir, record)
    if record.unet_train_mode == "full":
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").requires_grad_(False)
    holder = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    apply_lora(holder, model_dir, fuse=True)
    return holder.unet, holder.text_encoder
