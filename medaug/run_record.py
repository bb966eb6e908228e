"""The run record: what a training run's output folder is, written and read here and nowhere else.

`medaug_args.json` in a run folder holds a versioned `RunRecord`: the base model, the condition kind and its
settings, how the UNet was trained, the resolution and channels generation must use, the ControlNet's edge method,
and, for reading and replay, every flag the script was given. Readers get typed fields with defaults, never
`dict.get` with a default of their own. A model card (`README.md`) is written beside it.

A moved base: a local base inside the run folder's parent (the demo's layout, `out/base` beside `out/finetune`) is
also stored relative to the run folder, so moving the parent keeps the run loadable; anywhere else, `base_model=`
(`medaug generate --base_model`) points to its new place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medaug.files import write_json_atomic, write_text_atomic
from medaug.records import RecordError, checked_fields

RECORD_NAME = "medaug_args.json"
CARD_NAME = "README.md"
RECORD_VERSION = 2
logger = logging.getLogger("medaug.run_record")


class RunRecordError(ValueError):
    """A run folder's record is missing, unreadable or points to something that is not there; the message says
    which and what to pass."""


@dataclass
class RunRecord:
    base_model: str  # as read: where the base is now (a local folder or a Hub name)
    resolution: int
    script: str  # "finetune", "train_controlnet"
    conditioning: str = "text"
    condition_settings: dict = field(default_factory=dict)  # the kind's `settings` (medaug.conditioning)
    unet_train_mode: str = "lora"  # "lora", "full" (unet/ in the folder) or "frozen" (a ControlNet on the bare base)
    rank: int | None = None
    train_text_encoder: bool = False
    fit: str = "pad"
    channels: int = 3  # 1 when the training images were grey: generation then stores grey PNGs
    unet_mask_channels: int = 0  # >0: the UNet reads the mask as extra input channels (MedaugMaskPipeline)
    prediction_type: str | None = None
    vae_scaling_factor: float | None = None
    controlnet: bool = False
    controlnet_train_mode: str | None = None
    edge_method: str | None = None  # None with a ControlNet: edge maps were read from conditioning_image_column
    conditioning_image_column: str | None = None
    lora_dir: str | None = None  # the fine-tune a ControlNet run was built on
    generator: str = "latent_diffusion"  # or a family trained from nothing: "pix2pix", "gan", "autoencoder"
    generator_condition: str = "none"  # gan/autoencoder: what images are drawn for: "none", "class" or "mask"
    class_names: list = field(default_factory=list)  # generator_condition "class": the classes, as `label` holds them
    train_data_dir: str | None = None
    split: str = "train"
    steps: int = 0
    seed: int = 0
    num_processes: int = 1
    mixed_precision: str | None = None
    arguments: dict = field(default_factory=dict)  # every flag as parsed
    version: int = RECORD_VERSION

    @property
    def embeddings_file(self) -> str | None:
        return self.condition_settings.get("embeddings_file")


def local_base(base: str) -> Path | None:
    """The base as a folder on this machine, or None for a Hub name (or no base: generators trained from nothing)."""
    if not base:
        return None
    path = Path(base).expanduser()
    return path.resolve() if path.is_dir() else None


def write_run_record(output_dir: str | Path, record: RunRecord) -> Path:
    """medaug_args.json (the base also relative to the run folder when it lies beside it) and README.md."""
    output_dir = Path(output_dir)
    payload = asdict(record)
    base = local_base(record.base_model)
    if base is not None:
        payload["base_model"] = str(base)
        if base.is_relative_to(output_dir.resolve().parent):
            payload["base_model_relative"] = os.path.relpath(base, output_dir.resolve())
    write_json_atomic(output_dir / RECORD_NAME, payload, indent=2)
    write_text_atomic(output_dir / CARD_NAME, model_card(record))
    return output_dir / RECORD_NAME


def read_run_record(model_dir: str | Path, base_model: str | Path | None = None) -> RunRecord:
    """The record of a run folder, its base resolved (`base_model` overrides where the record says it is)."""
    model_dir = Path(model_dir)
    path = model_dir / RECORD_NAME
    if not path.is_file():
        raise RunRecordError(f"{model_dir}: not a medaug run folder (no {RECORD_NAME})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunRecordError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(raw, dict):
        raise RunRecordError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("version", 1)
    if not isinstance(version, int):
        raise RunRecordError(f"{path}: field 'version' should be int, got {version!r}")
    if version > RECORD_VERSION:
        raise RunRecordError(f"{path}: record version {version} is newer than this medaug reads "
                             f"({RECORD_VERSION}); upgrade medaug")
    if version == 1:
        missing = [key for key in ("base_model", "resolution") if key not in raw]
        if missing:
            raise RunRecordError(f"{path}: lacks field(s) {missing}; the run folder's record is damaged or was edited")
        raw = _from_version_1(raw)
    try:  # keys beside the fields (base_model_relative) are the reader's business
        record = RunRecord(**checked_fields(raw, RunRecord, str(path), allow_unknown=True))
    except RecordError as error:
        raise RunRecordError(f"{error}; the run folder's record is damaged or was edited") from None
    record.base_model = _resolve_base(model_dir, raw, base_model)
    return record


def _resolve_base(model_dir: Path, raw: dict, override) -> str:
    if override is not None:
        if local_base(str(override)) is None and Path(str(override)).expanduser().exists():
            raise RunRecordError(f"--base_model: {override} is not a folder")
        return str(local_base(str(override)) or override)
    relative = raw.get("base_model_relative")
    if relative and (model_dir / relative).is_dir():
        return str((model_dir / relative).resolve())
    stored = raw["base_model"]
    if Path(stored).is_absolute() and not Path(stored).is_dir():
        raise RunRecordError(f"{model_dir}: its base model {stored} is not there (moved or deleted); pass "
                             "--base_model with where it is now")
    return stored


def _from_version_1(raw: dict) -> dict:
    """Records written before versioning: the parsed flags themselves, plus a few extras."""
    from medaug.conditioning import condition_class

    kind = raw.get("conditioning") or "text"
    controlnet = bool(raw.get("controlnet"))
    mode = raw.get("train_mode") or ("full" if raw.get("lora_dir") is None and controlnet else "lora")
    return {
        "base_model": raw["base_model"], "resolution": raw["resolution"],
        "script": "train_controlnet" if controlnet else "finetune", "conditioning": kind,
        "condition_settings": condition_class(kind).settings_from(raw), "unet_train_mode": mode,
        "rank": raw.get("rank"), "train_text_encoder": bool(raw.get("train_text_encoder")),
        "fit": raw.get("fit") or "pad", "channels": _legacy_channels(raw),
        "prediction_type": raw.get("prediction_type"), "vae_scaling_factor": raw.get("vae_scaling_factor"),
        "controlnet": controlnet, "controlnet_train_mode": raw.get("controlnet_train_mode"),
        "edge_method": raw.get("edge_method"), "conditioning_image_column": raw.get("conditioning_image_column"),
        "lora_dir": raw.get("lora_dir"), "train_data_dir": raw.get("train_data_dir"),
        "split": raw.get("split") or "train", "steps": raw.get("max_train_steps") or 0, "seed": raw.get("seed") or 0,
        "num_processes": raw.get("num_processes") or 1, "mixed_precision": raw.get("mixed_precision"),
        "arguments": raw,
    }


def _legacy_channels(raw: dict) -> int:
    """Version 1 did not record channels: read them once from the training data, as generation used to."""
    from medaug.data import DatasetFolder
    from medaug.training.latents import image_channels

    try:
        folder = DatasetFolder(raw["train_data_dir"])
        return image_channels(folder, folder.indices(raw.get("split") or None))
    except (KeyError, TypeError, ValueError, OSError):
        logger.warning("a version-1 run record whose training data is gone: generating 3-channel images")
        return 3


def model_card(record: RunRecord) -> str:
    """README.md of a run folder, in the shape of diffusers' training scripts' cards."""
    if record.generator != "latent_diffusion":
        return generator_card(record)
    settings = ", ".join(f"{key}={value}" for key, value in record.condition_settings.items()) or "none"
    what = "a ControlNet on edge maps" if record.controlnet else f"the UNet ({record.unet_train_mode})"
    load = ("from diffusers import ControlNetModel\ncontrolnet = ControlNetModel.from_pretrained(\"RUN/controlnet\")"
            if record.controlnet else _stock_loading(record))
    return f"""---
library_name: diffusers
base_model: {record.base_model}
tags: [medaug, stable-diffusion, {"controlnet" if record.controlnet else "lora"}, medical-imaging]
---

# medaug run: {record.script}

Trains {what} of `{record.base_model}` on `{record.train_data_dir}` (split `{record.split}`) for {record.steps}
steps at {record.resolution} px, seed {record.seed}, {record.num_processes} process(es), mixed precision
`{record.mixed_precision}`.

- condition: `{record.conditioning}` ({settings})
- edge maps: {record.edge_method or ("precomputed" if record.controlnet else "none")}
- images stored with {record.channels} channel(s); fitted to the square by `{record.fit}`

## Use

```bash
medaug generate --model_dir RUN --from_masks DATASET_DIR --output_dir SYNTHETIC   # --base_model if the base moved
```

```python
from medaug.pipelines import {"MedaugControlNetPipeline" if record.controlnet else "MedaugPipeline"}
pipe = {"MedaugControlNetPipeline" if record.controlnet else "MedaugPipeline"}.from_medaug("RUN")
```

With stock diffusers alone:

```python
{load}
```
{_condition_note(record)}
`medaug_args.json` holds the full record (version {record.version}) and every flag of the run.
"""


GENERATOR_PIPELINES = {"pix2pix": "MedaugPix2PixPipeline", "gan": "MedaugGeneratorPipeline",
                       "autoencoder": "MedaugGeneratorPipeline"}
# Each family trained from nothing saves its network in a folder of the run named after the family.
FAMILY_FOLDERS = tuple(GENERATOR_PIPELINES)


def generator_card(record: RunRecord) -> str:
    """The card of a generator trained from nothing (pix2pix, gan, autoencoder): no base model."""
    condition = "mask" if record.generator == "pix2pix" else record.generator_condition
    what, source, call = {
        "mask": ("an image for a mask", "--from_masks DATASET_DIR", "mask_image=mask"),
        "class": (f"an image of a class ({', '.join(record.class_names)})", "--from_images DATASET_DIR",
                  f"class_labels=[\"{record.class_names[0] if record.class_names else ''}\"]"),
    }.get(condition, ("an image from noise alone", "--from_images DATASET_DIR", "num_images=1"))
    pipeline = GENERATOR_PIPELINES.get(record.generator, "MedaugGeneratorPipeline")
    return f"""---
library_name: diffusers
tags: [medaug, {record.generator}, medical-imaging]
---

# medaug run: {record.script}

A {record.generator} generator trained from scratch on `{record.train_data_dir}` (split `{record.split}`) for
{record.steps} steps at {record.resolution} px, seed {record.seed}; it draws {what}
({record.channels} channel(s)).

```bash
medaug generate --model_dir RUN {source} --output_dir SYNTHETIC
```

```python
from medaug.pipelines import {pipeline}
pipe = {pipeline}.from_medaug("RUN")
image = pipe({call}).images[0]
```

`medaug_args.json` holds the full record (version {record.version}) and every flag of the run.
"""


def _condition_note(record: RunRecord) -> str:
    from medaug.conditioning import condition_class

    if condition_class(record.conditioning).argument == "prompt":
        return ""
    return ("\nThe stock pipeline encodes text only: give it `prompt_embeds=projection(features)` and "
            "`negative_prompt_embeds=projection.unconditional_embedding(batch)`, with\n"
            "`projection = medaug.conditioning.ConditionProjection.from_pretrained(\"RUN/condition_encoder\")`.\n")


def _stock_loading(record: RunRecord) -> str:
    if record.unet_train_mode == "full":
        return ("from diffusers import StableDiffusionPipeline, UNet2DConditionModel\n"
                f"pipe = StableDiffusionPipeline.from_pretrained(\"{record.base_model}\")\n"
                "pipe.unet = UNet2DConditionModel.from_pretrained(\"RUN/unet\")")
    return ("from diffusers import StableDiffusionPipeline\n"
            f"pipe = StableDiffusionPipeline.from_pretrained(\"{record.base_model}\")\n"
            "pipe.load_lora_weights(\"RUN\", weight_name=\"pytorch_lora_weights.safetensors\")")
