"""Adapters trained elsewhere: a base plus a diffusers-format LoRA file and/or ControlNet folder, as a run folder.

A LoRA saved by diffusers' own training scripts (`StableDiffusionPipeline.save_lora_weights`, or any format its
`load_lora_weights` reads) and a ControlNet saved with `ControlNetModel.save_pretrained` carry no medaug run
record. `adapter_run_folder` writes one for them, text-conditioned, with the resolution the base was made for, in
a folder of the medaug cache keyed by the files' paths: the weights are linked there, not copied, so
`medaug generate` and the pipelines load them through the one run loader, with its checks (safetensors only, the
ControlNet fits the base).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from medaug.files import safetensors_problem
from medaug.run_record import RECORD_NAME, RunRecord, RunRecordError, local_base, write_run_record
from medaug.training.lora import LORA_WEIGHTS_NAME

ADAPTER_SCRIPT = "diffusers adapters"


def adapter_run_folder(base_model: str | None, lora_weights: str | Path | None, controlnet: str | Path | None,
                       cache_dir: str | Path | None = None) -> Path:
    """A run folder for `base_model` with the LoRA file and ControlNet folder given (either may be None)."""
    if not base_model:
        raise RunRecordError("--base_model: give the base the adapters were trained on (a diffusers folder or a "
                             "Hub name) with --lora_weights or --controlnet")
    base_model = str(local_base(base_model) or base_model)  # a local folder by its absolute path
    lora = _lora_file(lora_weights) if lora_weights is not None else None
    control = _controlnet_folder(controlnet, base_model) if controlnet is not None else None
    folder = _adapter_folder(base_model, lora, control, cache_dir)
    if (folder / RECORD_NAME).is_file():
        return folder  # made before: its name is the hash of the base's and the files' paths
    resolution = base_resolution(base_model)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if lora:
        (partial / LORA_WEIGHTS_NAME).symlink_to(lora)
    if control:
        (partial / "controlnet").symlink_to(control, target_is_directory=True)
    write_run_record(partial, RunRecord(
        base_model=base_model, resolution=resolution, script=ADAPTER_SCRIPT,
        unet_train_mode="lora" if lora else "frozen", controlnet=control is not None,
        arguments={"base_model": base_model, "lora_weights": str(lora) if lora else None,
                   "controlnet": str(control) if control else None}))
    try:
        partial.rename(folder)  # whole or not at all; another process may have made it first
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def base_resolution(base_model: str) -> int:
    """The image size the base's UNet was built for: its sample size times the VAE's downsampling."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    vae = AutoencoderKL.load_config(base_model, subfolder="vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _lora_file(path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RunRecordError(f"--lora_weights: {path} is not a file (give the .safetensors file itself)")
    if path.suffix != ".safetensors":
        raise RunRecordError(f"--lora_weights: {path} is not a .safetensors file; medaug never loads pickle "
                             "weights (convert it with safetensors first)")
    problem = safetensors_problem(path)
    if problem:
        raise RunRecordError(f"--lora_weights: {path}: {problem}")
    return path


def _controlnet_folder(path: str | Path, base_model: str) -> Path:
    """A ControlNet folder whose weights are safetensors and whose shape fits the base's UNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    path = Path(path).expanduser().resolve()
    weights = path / "diffusion_pytorch_model.safetensors"
    if not (path / "config.json").is_file() or not (weights.is_file() or Path(f"{weights}.index.json").is_file()):
        raise RunRecordError(f"--controlnet: {path} is not a ControlNet folder with safetensors weights "
                             "(config.json and diffusion_pytorch_model.safetensors, as save_pretrained writes)")
    control = ControlNetModel.load_config(path)
    unet = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    differences = [f"{key} {control.get(key)} vs {unet.get(key)}" for key in ("block_out_channels",
                   "cross_attention_dim", "layers_per_block") if list(_listed(control.get(key))) !=
                   list(_listed(unet.get(key)))]
    if differences:
        raise RunRecordError(f"--controlnet: {path} does not fit the base's UNet ({'; '.join(differences)}); "
                             "it was made for another base")
    return path


def _listed(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _adapter_folder(base_model: str, lora: Path | None, control: Path | None, cache_dir) -> Path:
    from medaug.training.cache import DEFAULT_CACHE_DIR

    key = hashlib.sha256("\n".join([base_model, str(lora), str(control)]).encode()).hexdigest()[:16]
    return Path(cache_dir or DEFAULT_CACHE_DIR) / "adapters" / key
