"""`medaug demo`: the whole chain on a phantom (or a given) dataset, one resumable stage at a time.

data -> base model (`small` preset) -> VAE -> fine-tune on label prompts, the UNet reading each mask as an input
channel (`generator="mask_channels"`, the default; or `"controlnet"`: a text fine-tune, then a ControlNet on mask
edges) -> generate images for the training masks -> domain encoder, quality metrics and label fidelity ->
segmentation study real vs real+synthetic -> report.html. Each finished stage leaves `stages/<name>.json`; a rerun skips those and resumes the others
(training scripts from their latest checkpoint, generation from its manifest). The training scripts run in this
process from the installed `medaug.scripts`, exactly as `python -m medaug.scripts.NAME` would run them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medaug.data.folder import is_dataset_folder
from medaug.files import write_json_atomic
from medaug.outputs import folder_entries
from medaug.speed import DEFAULT_STEPS
from medaug.training.run_scripts import rerun_flags, run_script

STAGE_FOLDER = "stages"
# What a demo writes in its folder; --overwrite removes these and nothing else.
DEMO_ENTRIES = (STAGE_FOLDER, "demo.json", "report.html", "data", "base", "cache", "consistency_segmenter",
                "controlnet", "encoder", "evaluate", "finetune", "segmentation", "synthetic")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo does at each stage; defaults finish in under 15 minutes on a 2-core CPU."""

    phantom_images: int = 48
    phantom_size: int = 128
    preset: str = "small"
    generator: str = "mask_channels"  # or "controlnet": how generated images are made to follow their masks
    consistency: bool = True  # mask_channels: add the mask-consistency loss (a segmenter must find the mask)
    segmenter_epochs: int = 30  # the consistency segmenter's training
    resolution: int = 64
    max_train_samples: int | None = None  # use the first N training rows (real data can be large)
    vae_steps: int = 150
    finetune_steps: int = 600
    controlnet_steps: int = 500
    train_batch_size: int = 8
    edge_method: str = "mask_boundary"
    num_per_source: int = 2
    inference_steps: int = DEFAULT_STEPS  # medaug generate's default sampler (DPM-Solver++)
    guidance_scale: float = 3.0
    encoder_steps: int = 60
    seg_resolution: int = 64
    seg_steps: int = 150  # every arm, as in medaug bench and study
    seg_seeds: int = 3
    seed: int = 0

    @classmethod
    def field_names(cls) -> list[str]:
        return [item.name for item in fields(cls)]


class DemoError(ValueError):
    """The demo cannot run as asked; the message names the flag or folder."""


# ---------------------------------------------------------------------------------------------------------
# Stages: each takes the demo's folders and settings and returns what the report shows.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Demo:
    output_dir: Path
    data: Path | None
    settings: DemoSettings

    carve: bool = False  # the data has no val split: the demo works on a copy with the carve in its metadata

    @property
    def dataset(self) -> Path:
        return self.data if self.data is not None and not self.carve else self.output_dir / "data"

    def path(self, name: str) -> Path:
        return self.output_dir / name

    def caption_column(self) -> str:
        from medaug.data import DatasetFolder

        return "text" if DatasetFolder(self.dataset).has_column("text") else "label"

    def common_flags(self) -> list:
        flags = ["--train_data_dir", self.dataset, "--resolution", self.settings.resolution, "--report_to", "none",
                 "--seed", self.settings.seed, "--latent_cache_dir", self.path("cache")]
        if self.settings.max_train_samples:
            flags += ["--max_train_samples", self.settings.max_train_samples]
        return flags


def stage_data(demo: Demo) -> dict:
    from medaug.data import DatasetError, DatasetFolder, make_phantom_dataset
    from medaug.data.subset import write_rows
    from medaug.data.validation import ensure_validation

    if demo.data is None:
        shutil.rmtree(demo.dataset, ignore_errors=True)
        make_phantom_dataset(demo.dataset, num_images=demo.settings.phantom_images,
                             size=demo.settings.phantom_size, seed=demo.settings.seed)
    source = demo.data if demo.data is not None else demo.dataset
    folder = DatasetFolder(source)
    result = folder.check()
    if result.problems:
        raise DemoError(f"--data: {source} has {len(result.problems)} problem(s), first: "
                        f"{result.problems[0]}; run `medaug inspect {source}` for all of them")
    if not folder.has_column("mask_file_name"):
        raise DemoError(f"--data: {source} has no mask_file_name column; the demo generates images for "
                        "masks and trains a segmentation model on them")
    splits = {split: sum(folder.split(i) == split for i in range(len(folder))) for split in ("train", "val", "test")}
    if not splits["train"] or not splits["test"]:
        raise DemoError(f"--data: {source} needs train and test rows, has {splits}")
    try:
        validation = ensure_validation(folder)
    except DatasetError as error:
        raise DemoError(f"--data: {error}") from error
    if demo.carve:  # every stage, generators included, reads the copy: none trains on the carved val rows
        shutil.rmtree(demo.dataset, ignore_errors=True)
        write_rows(folder, demo.dataset, list(range(len(folder))))
    splits = {split: len(folder.indices(split)) for split in ("train", "val", "test")}
    return {"dataset": str(source), "phantom": demo.data is None, "splits": splits, "validation": validation.record()}


def stage_base(demo: Demo) -> dict:
    from medaug.data import DatasetFolder
    from medaug.models import init_model

    folder = DatasetFolder(demo.dataset)
    column = demo.caption_column()
    prompts = sorted({folder.value(i, column) for i in range(len(folder))})
    base = demo.path("base")
    shutil.rmtree(base, ignore_errors=True)
    init_model(base, preset=demo.settings.preset, prompts=prompts, seed=demo.settings.seed)
    return {"base": str(base), "model": json.loads((base / "medaug_model.json").read_text())}


def stage_vae(demo: Demo) -> dict:
    settings = demo.settings
    arguments = ["--pretrained_model_name_or_path", demo.path("base"), "--train_data_dir", demo.dataset,
                 "--resolution", settings.resolution, "--max_train_steps", settings.vae_steps,
                 "--train_batch_size", settings.train_batch_size, "--seed", settings.seed,
                 "--checkpointing_steps", 50, "--max_eval_images", 32]
    checkpoints = demo.path("base") / "vae_checkpoints"
    if any(checkpoints.glob("checkpoint-*")):
        arguments += ["--resume_from_checkpoint", "latest"]
    report = run_script("train_vae", arguments)
    return {key: report[key] for key in ("steps", "before_training", "after_training", "test_images")}


def _training_summary(summary: dict) -> dict:
    losses = summary["losses"]
    window = max(1, len(losses) // 10)
    return {"steps": summary["global_step"], "steps_per_second": summary["steps_per_second"],
            "loss_first": sum(losses[:window]) / window if losses else None,
            "loss_last": sum(losses[-window:]) / window if losses else None, "output_dir": summary["output_dir"]}


GENERATORS = ("mask_channels", "controlnet")


def uses_consistency(settings: DemoSettings) -> bool:
    return settings.generator == "mask_channels" and settings.consistency


def stage_segmenter(demo: Demo) -> dict:
    """The segmenter the consistency loss asks; another seed than the one that scores label fidelity later."""
    from medaug.metrics.fidelity import train_fidelity_segmenter

    settings = demo.settings
    if not uses_consistency(settings):
        return {"skipped": "no mask-consistency loss in this demo's settings"}
    segmenter = train_fidelity_segmenter(demo.dataset, settings.resolution, settings.segmenter_epochs,
                                         settings.seed + 1)
    segmenter.save(demo.path("consistency_segmenter"))
    return {"real_dice": segmenter.info.real_dice, "real_pairs": segmenter.info.real_pairs,
            "folder": str(demo.path("consistency_segmenter"))}


def stage_finetune(demo: Demo) -> dict:
    settings, output_dir = demo.settings, demo.path("finetune")
    mask_flags = ["--mask_channels"] if settings.generator == "mask_channels" else []
    if uses_consistency(settings):
        mask_flags += ["--consistency_segmenter", demo.path("consistency_segmenter")]
    arguments = ["--pretrained_model_name_or_path", demo.path("base"), *demo.common_flags(), *mask_flags,
                 "--output_dir", output_dir, "--conditioning", "text", "--caption_column", demo.caption_column(),
                 "--train_mode", "full", "--learning_rate", 3e-4, "--max_train_steps", settings.finetune_steps,
                 "--train_batch_size", settings.train_batch_size, "--checkpointing_steps", 100,
                 "--checkpoints_total_limit", 1, "--validation_steps", settings.finetune_steps,
                 "--validation_inference_steps", settings.inference_steps, *rerun_flags(output_dir)]
    return _training_summary(run_script("finetune", arguments))


def stage_controlnet(demo: Demo) -> dict:
    settings, output_dir = demo.settings, demo.path("controlnet")
    if settings.generator != "controlnet":
        return {"skipped": "the fine-tuned UNet reads each mask as an input channel; no ControlNet is needed"}
    arguments = ["--lora_dir", demo.path("finetune"), *demo.common_flags(), "--output_dir", output_dir,
                 "--edge_method", settings.edge_method, "--controlnet_train_mode", "full", "--learning_rate", 3e-4,
                 "--max_train_steps", settings.controlnet_steps, "--train_batch_size", settings.train_batch_size,
                 "--checkpointing_steps", 100, "--checkpoints_total_limit", 1,
                 "--validation_steps", settings.controlnet_steps, "--validation_inference_steps",
                 settings.inference_steps, *rerun_flags(output_dir)]
    return _training_summary(run_script("train_controlnet", arguments))


def stage_generate(demo: Demo) -> dict:
    from medaug.generate import generate

    settings = demo.settings
    model = demo.path("controlnet" if settings.generator == "controlnet" else "finetune")
    summary = generate(model, demo.path("synthetic"), from_masks=demo.dataset, split="train",
                       num_per_source=settings.num_per_source, num_inference_steps=settings.inference_steps,
                       guidance_scale=settings.guidance_scale, seed=settings.seed, batch_size=8, resume=True,
                       max_sources=settings.max_train_samples)
    return {key: summary[key] for key in ("written", "skipped", "total", "seconds", "images_per_second")}


def stage_evaluate(demo: Demo) -> dict:
    from medaug.metrics.encoder import load_training_images, train_encoder
    from medaug.metrics.evaluate import evaluate
    from medaug.metrics.features import build_extractor
    from medaug.metrics.imagesets import open_image_set

    settings = demo.settings
    encoder_dir = demo.path("encoder")
    images = load_training_images(demo.dataset, "train", 1, settings.seg_resolution, "pad", None)
    train_encoder(images, encoder_dir, max_train_steps=settings.encoder_steps, train_batch_size=32,
                  seed=settings.seed)
    extractor = build_extractor("encoder", encoder_dir=encoder_dir)
    real = open_image_set(demo.dataset, "train", "--real")
    synthetic = open_image_set(demo.path("synthetic"), None, "--synthetic")
    results = evaluate(real, synthetic, extractor, demo.path("evaluate"), kid_subsets=20, diversity_pairs=50,
                       seed=settings.seed)
    metrics = results["features"]["metrics"]
    return {"metrics": {key: metrics[key] for key in ("frechet_distance", "kid_mean", "kid_std", "precision",
                                                      "recall", "density", "coverage")},
            "diversity": {name: results["diversity"][name]["ms_ssim_mean"] for name in ("real", "synthetic")},
            "near_copies": results["memorisation"]["flagged_count"], "synthetic_images": results["synthetic"]["images"],
            "label_fidelity": {key: value for key, value in results["label_fidelity"].items()
                               if key in ("synthetic_dice", "real_dice", "ratio", "share_above_0_5", "pairs",
                                          "skipped")},
            "report": str(demo.path("evaluate") / "report.html")}


def stage_segmentation(demo: Demo) -> dict:
    from medaug.segmentation.study import run_study

    settings = demo.settings
    summary = run_study("seg", demo.dataset, demo.path("segmentation"), synthetic_dirs=[demo.path("synthetic")],
                        resolution=settings.seg_resolution, steps=settings.seg_steps, seeds=settings.seg_seeds,
                        synthetic_ratios=(1.0,), arms=("real", "real+synthetic"), gradcam_images=0)
    return {"groups": summary["groups"], "primary_metric": summary["primary_metric"], "notes": summary["notes"],
            "results": str(demo.path("segmentation") / "results.md")}


STAGES: dict[str, tuple[str, Callable[[Demo], dict]]] = {
    "data": ("dataset", stage_data),
    "base": ("base model (init-model)", stage_base),
    "vae": ("train the VAE", stage_vae),
    "segmenter": ("a segmenter for the mask-consistency loss", stage_segmenter),
    "finetune": ("fine-tune on label prompts (and masks)", stage_finetune),
    "controlnet": ("train a ControlNet on mask edges (controlnet generator only)", stage_controlnet),
    "generate": ("generate images with masks", stage_generate),
    "evaluate": ("quality metrics", stage_evaluate),
    "segmentation": ("segmentation: real vs real+synthetic", stage_segmentation),
}


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

def open_demo_folder(output_dir: Path, data: Path | None, settings: DemoSettings, overwrite: bool) -> None:
    """Refuse a folder holding another demo (other data or settings) unless `overwrite`, and a non-empty folder
    holding no demo; `overwrite` removes the demo's own entries only."""
    record = {"data": str(data.resolve()) if data else None, "settings": asdict(settings)}
    path = output_dir / "demo.json"
    if not path.is_file() and folder_entries(output_dir):
        raise DemoError(f"--output_dir: {output_dir} is not empty and holds no demo; medaug replaces only its own "
                        "output (--overwrite included), so choose a new or empty folder")
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text())
        # Demos written before the setting took the training scripts' name.
        previous["settings"].setdefault("max_train_samples", previous["settings"].pop("max_train_images", None))
        if previous != record:
            changed = sorted(key for key in record["settings"] if previous["settings"].get(key)
                             != record["settings"][key]) or ["data"]
            raise DemoError(f"--output_dir: {output_dir} holds a demo run with other settings ({', '.join(changed)});"
                            " choose another folder or pass --overwrite")
    for entry in folder_entries(output_dir) if overwrite else []:
        if entry.name in DEMO_ENTRIES:  # the user's files beside a demo are kept
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (output_dir / STAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def has_val_rows(data: Path) -> bool:
    from medaug.data import DatasetError, DatasetFolder
    from medaug.data.validation import val_rows

    try:
        folder = DatasetFolder(data)
    except DatasetError as error:
        raise DemoError(f"--data: {error}") from error
    return bool(val_rows(folder))


def run_demo(output_dir: str | Path, data: str | Path | None = None, settings: DemoSettings | None = None,
             overwrite: bool = False, on_stage: Callable[[int, int, str, bool], None] | None = None) -> Path:
    """Run every unfinished stage, then write `OUT/report.html`; return its path."""
    from medaug.demo_report import write_demo_report

    settings = settings or DemoSettings()
    if settings.generator not in GENERATORS:
        raise DemoError(f"--generator: unknown generator '{settings.generator}'; expected one of "
                        f"{', '.join(GENERATORS)}")
    output_dir = Path(output_dir)
    data = Path(data) if data is not None else None
    if data is not None and not is_dataset_folder(data):
        raise DemoError(f"--data: {data} is not a dataset folder (no metadata file, at its top or in split folders)")
    if data is not None and data.resolve().is_relative_to(output_dir.resolve()):
        raise DemoError(f"--data: {data} lies in --output_dir {output_dir}, whose entries the demo replaces; keep "
                        "the dataset outside it")
    open_demo_folder(output_dir, data, settings, overwrite)
    demo = Demo(output_dir, data, settings, carve=data is not None and not has_val_rows(data))
    records = {}
    for number, (name, (title, stage)) in enumerate(STAGES.items(), start=1):
        record_path = output_dir / STAGE_FOLDER / f"{name}.json"
        done = record_path.is_file()
        if on_stage is not None:
            on_stage(number, len(STAGES), title, done)
        if done:
            records[name] = json.loads(record_path.read_text())
            continue
        started = time.perf_counter()
        result = stage(demo)
        records[name] = {"title": title, "seconds": time.perf_counter() - started, "result": result}
        write_json_atomic(record_path, records[name], indent=2)
    return write_demo_report(demo, records)
