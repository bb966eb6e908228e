"""Loading a run folder's modules: the base model with the run's UNet, its condition modules, its ControlNet, and
its LoRA applied to a pipeline. `medaug.pipelines`, `medaug generate` and train_controlnet.py's `--lora_dir` all
load through here; what the folder is comes from its record (`medaug.run_record`)."""

from __future__ import annotations

from pathlib import Path

from medaug.conditioning import condition_class, load_projection
from medaug.files import pickled_files, safetensors_problem
from medaug.run_record import FAMILY_FOLDERS, RunRecord, RunRecordError, read_run_record
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
GENERATOR_FILES = {family: f"{family}/config.json" for family in FAMILY_FOLDERS}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained writes in a model folder


# Settings that differ from the base's scheduler config. DPM-Solver++ starts from the last training timestep
# ("trailing" spacing): with the "leading" spacing of SD-style configs, 10 steps start at t=901 instead of 999; on
# medaug demo's model that raised the Fréchet distance to real images from 45.6 to 54.0 (bootstrap std about 3;
# benchmarks/RESULTS.md, "Speed").
SCHEDULER_SETTINGS = {"dpm++": {"timestep_spacing": "trailing"}}


def make_scheduler(name: str, config):
    """The scheduler `name` (a key of SCHEDULERS) built from a base scheduler's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"--scheduler: unknown scheduler '{name}'; expected one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config, **SCHEDULER_SETTINGS.get(name, {}))


def base_scheduler(base: str):
    """The base's own scheduler, of the class its scheduler_config.json names."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(base, subfolder="scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


def required_weights(record: RunRecord) -> list[str]:
    """The weight files, relative to the run folder, that its record says it holds."""
    from medaug.conditioning import condition_class

    if record.generator in GENERATOR_FILES:
        return [f"{Path(GENERATOR_FILES[record.generator]).parent}/{WEIGHTS_NAME}"]
    needed = {"full": [f"unet/{WEIGHTS_NAME}"], "lora": [LORA_WEIGHTS_NAME]}.get(record.unet_train_mode, [])
    if record.controlnet:
        needed.append(f"controlnet/{WEIGHTS_NAME}")
    if "condition_encoder" in condition_class(record.conditioning).required_components:
        needed.append(f"condition_encoder/{WEIGHTS_NAME}")
    return needed


def check_run_files(model_dir: Path, record: RunRecord) -> None:
    """Every weights file the record implies is there and reads as safetensors, and every other safetensors file
    of the run reads too: a run missing one would generate from the bare base and say nothing, and a damaged one
    would fail deep inside diffusers. Checkpoints are not looked at (generation never reads them)."""
    for name in required_weights(record):
        path = model_dir / name
        if path.is_file() or path.with_name(path.name + ".index.json").is_file():
            continue
        pickled = pickled_files(path.parent)
        if pickled:
            raise RunRecordError(f"{path.parent}: holds pickle weights ({', '.join(pickled)}), which medaug "
                                 f"never loads; convert them to {path.name}")
        raise RunRecordError(f"{model_dir}: {name} is missing ({record.script} run, {record.unet_train_mode} UNet); "
                             "the folder is incomplete (copy it again, or retrain)")
    for path in sorted(model_dir.rglob("*.safetensors")):
        if not any(part.startswith("checkpoint-") for part in path.relative_to(model_dir).parts):
            check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or edited safetensors file of a run folder by name."""
    problem = safetensors_problem(path)
    if problem:
        raise RunRecordError(f"{path}: {problem}; the run folder is damaged (copy it again, or retrain)")


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
        "vae": AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True),
        "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True),
        "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        "unet": UNet2DConditionModel.from_pretrained(model_dir / "unet" if full_unet else base,
                                                     subfolder=None if full_unet else "unet", use_safetensors=True),
        "scheduler": make_scheduler(scheduler, own_scheduler.config) if isinstance(scheduler, str)
        else scheduler or own_scheduler,
        "condition_encoder": load_projection(model_dir) if (model_dir / "condition_encoder").is_dir() else None,
        "controlnet": (ControlNetModel.from_pretrained(model_dir / "controlnet", use_safetensors=True)
                       if record.controlnet else None),
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
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", use_safetensors=True).requires_grad_(False)
    holder = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    apply_lora(holder, model_dir, fuse=True)
    return holder.unet, holder.text_encoder
