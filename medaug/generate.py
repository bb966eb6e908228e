"""`medaug generate`: a synthetic dataset folder from a medaug output folder.

Structure comes from one source: edge maps (`edges`: a dataset folder naming them in
conditioning_image_file_name, or a plain folder of edge images at the output size), masks (`from_masks`: edge
maps drawn from each row's mask, and the mask carried to the generated image) or images (`from_images`: edge
maps from each row's image, masks carried where rows have them). Conditions come from `prompt` or from each
source row (its text, its image as a reference, or its embedding). A model without a ControlNet uses the source
rows for their conditions only.

Every image is job (source, number) with its own seed, derived from `seed` and that pair only. Jobs are cut
into batches of `batch_size` in order, and under `accelerate launch` process k takes the batches whose number is
k modulo the number of processes; a batch is always sampled whole, so reruns and any split over processes give
bit-identical images (another --batch_size changes floating-point sums, by at most a grey level or so; "auto",
the default, depends on the memory free, so give a number where images must match across machines). Files
are written under a temporary name and renamed; a job is done once its manifest line is written; a rerun skips
done jobs.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medaug.conditioning import Condition, condition_class, load_projection
from medaug.data import MANIFEST_NAME, ManifestEntry, append_manifest, to_channels
from medaug.generate_sources import (GENERATOR_FAMILIES, Source, generator_sources, own_training_source,
                                     plan_sources)
from medaug.outputs import output_lock, refuse_input_folder
from medaug.run_loader import SCHEDULERS, check_run_files
from medaug.run_record import RECORD_NAME, RunRecord, read_run_record
from medaug.speed import (DEFAULT_SCHEDULER, DEFAULT_STEPS, auto_batch_size, autocast, choose_threads,
                          resolve_precision, sampling_bytes_per_image)
from medaug.synthetic import (check_output_folder, finished_files, prepare_output_folder, write_array_png,
                              write_metadata)
from medaug.training.base_model import vae_downsampling

# The arguments that define a synthetic folder's images: a rerun with any of them changed is refused, except
# that --resume may raise num_per_source and max_sources (existing images keep their seeds).
GROWABLE = ("num_per_source", "max_sources")


@dataclass
class Job:
    index: int  # position in the whole run
    source: int  # position in the source list
    number: int  # which image of its source
    seed: int
    file_name: str
    mask_file_name: str = ""


@dataclass
class Plan:
    """Everything a run generates, checked before any model is loaded or any file written."""

    record: RunRecord
    condition: Condition  # the run's condition kind (its encoders are the pipeline's)
    settings: dict
    sources: list[Source]
    jobs: list[Job]

    @property
    def controlnet(self) -> bool:
        return self.record.controlnet


def job_seed(seed: int, source: int, number: int) -> int:
    """A per-image seed from the run's seed and the image's (source, number) only."""
    return int(np.random.SeedSequence([seed, source, number]).generate_state(1)[0])


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)[-40:] if name else "prompt"


def make_jobs(sources: list[Source], num_per_source: int, seed: int) -> list[Job]:
    jobs = []
    for position, source in enumerate(sources):
        for number in range(num_per_source):
            name = f"{position:05d}_{number:03d}_{_stem(source.file_name)}.png"
            jobs.append(Job(len(jobs), position, number, job_seed(seed, position, number), f"images/{name}",
                            f"masks/{name}" if source.mask_path is not None else ""))
    return jobs


def model_identity(model_dir: Path) -> str:
    """What a model folder's weights are: each weight file's path, size and modification time, hashed."""
    from medaug.training.cache import file_identity

    parts = []
    for name in (RECORD_NAME, "pytorch_lora_weights.safetensors", "unet", "condition_encoder", "controlnet",
                 "pix2pix", *GENERATOR_FAMILIES):
        path = model_dir / name
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        parts += [file_identity(file) for file in files if file.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def plan_generation(model_dir, edges=None, from_masks=None, from_images=None, prompt=None, embeddings_file=None,
                    split="train", num_per_source=1, num_inference_steps=DEFAULT_STEPS, guidance_scale=3.0,
                    controlnet_conditioning_scale=1.0, scheduler=DEFAULT_SCHEDULER, seed=0, resolution=None,
                    max_sources=None, base_model=None, lora_weights=None, controlnet=None) -> Plan:
    """Check the flags, the model folder and the source, and list the jobs; raises ValueError naming the flag,
    file or column at fault. Without `model_dir`, the model is `base_model` with a diffusers-format LoRA file
    and/or ControlNet folder trained elsewhere (`medaug.adapters`)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler: unknown scheduler '{scheduler}'; expected one of {', '.join(SCHEDULERS)}")
    for flag, value in (("--num_per_source", num_per_source), ("--num_inference_steps", num_inference_steps),
                        ("--max_sources", max_sources if max_sources is not None else 1)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    given = {flag: path for flag, path in (("--edges", edges), ("--from_masks", from_masks),
                                           ("--from_images", from_images)) if path is not None}
    if len(given) > 1:
        raise ValueError(f"give one source of structure, not {' and '.join(given)}")
    model_dir = Path(_model_folder(model_dir, base_model, lora_weights, controlnet)).resolve()
    record = read_run_record(model_dir, base_model)
    check_run_files(model_dir, record)
    given = given or own_training_source(record, model_dir)
    resolution = int(resolution or record.resolution)
    if resolution < 8 or resolution % 8:
        raise ValueError(f"--resolution {resolution}: must be a positive multiple of 8")
    condition = planning_condition(model_dir, record, prompt, embeddings_file)
    flag, path = next(iter(given.items()), (None, None))
    sources, edge_method = plan_sources(record, condition, model_dir, flag, path, split, resolution, max_sources,
                                        prompt)
    sources = generator_sources(record, model_dir, flag, sources)
    if draws_for_masks(record) and any(source.mask_path is None for source in sources):
        raise ValueError(f"{flag or '--prompt'}: {model_dir} draws each image for a mask (a mask-channel UNet, "
                         "pix2pix, or a gan or autoencoder with --condition mask); give --from_masks with a dataset "
                         "whose rows have masks")
    settings = {
        "model_dir": str(model_dir), "model_identity": model_identity(model_dir), "conditioning": record.conditioning,
        "source": flag.lstrip("-") if flag else None, "source_dir": str(Path(path).resolve()) if path else None,
        "split": split if flag and sources[0].row is not None else None, "prompt": prompt,
        "embeddings_file": str(Path(embeddings_file).resolve()) if embeddings_file else None,
        "num_per_source": num_per_source, "max_sources": max_sources,
        "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "controlnet_conditioning_scale": controlnet_conditioning_scale if record.controlnet else None,
        "edge_method": edge_method, "scheduler": scheduler, "seed": seed, "resolution": resolution,
        "fit": record.fit, "channels": record.channels,
    }
    return Plan(record, condition, settings, sources, make_jobs(sources, num_per_source, seed))


def _model_folder(model_dir, base_model, lora_weights, controlnet) -> Path:
    """--model_dir, or a run folder made for adapters trained elsewhere."""
    from medaug.adapters import adapter_run_folder

    adapters = [flag for flag, value in (("--lora_weights", lora_weights), ("--controlnet", controlnet)) if value]
    if model_dir is not None and adapters:
        raise ValueError(f"give --model_dir (a medaug run) or {' and '.join(adapters)} with --base_model, not both")
    if model_dir is None and base_model is None:
        raise ValueError("give --model_dir (a medaug run), or --base_model with --lora_weights and/or --controlnet")
    return model_dir if model_dir is not None else adapter_run_folder(base_model, lora_weights, controlnet)


def draws_for_masks(record: RunRecord) -> bool:
    """Whether the run's generator takes the mask itself as input (not an edge map of it)."""
    return bool(record.unet_mask_channels) or record.generator == "pix2pix" or record.generator_condition == "mask"


def planning_condition(model_dir: Path, record: RunRecord, prompt, embeddings_file) -> Condition:
    """The run's condition, with its trained projection (it knows the input shape) but not its encoders, which
    only the pipeline loads; --prompt and --embeddings_file are checked against what the kind takes."""
    kind = condition_class(record.conditioning)
    if prompt is not None and kind.argument != "prompt":
        raise ValueError(f"--prompt: {model_dir} is conditioned on {record.conditioning}, not text; its conditions "
                         "come from the source rows")
    settings = dict(record.condition_settings)
    if embeddings_file is not None:
        if "embeddings_file" not in kind.settings:
            raise ValueError(f"--embeddings_file: {model_dir} is conditioned on {record.conditioning}, which takes "
                             "no embeddings file")
        settings["embeddings_file"] = str(embeddings_file)
    projection = load_projection(model_dir) if (model_dir / "condition_encoder").is_dir() else None
    return kind.from_components({"condition_encoder": projection}, settings)


def _condition_hash(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _batch_inputs(plan: Plan, batch: list[Job]) -> tuple[dict, list[str], list[str]]:
    """The pipeline's condition and control arguments for a batch, the prompts shown, the condition hashes."""
    values = [plan.sources[job.source].condition for job in batch]
    arguments = {"condition": values}
    prompts = [plan.condition.value_text(value) for value in values]
    parts = [[part] if (part := plan.condition.value_bytes(value)) is not None else [] for value in values]
    if plan.record.generator_condition == "class":  # a class-conditioned gan or autoencoder: the row's label
        arguments["class_labels"] = [plan.sources[job.source].label for job in batch]
        for part, label in zip(parts, arguments["class_labels"]):
            part.append(label.encode("utf-8"))
    if draws_for_masks(plan.record):
        masks = {job.source: plan.sources[job.source].fitted_mask(plan.settings["resolution"], plan.settings["fit"])
                 for job in batch}
        arguments["mask_image"] = [masks[job.source] for job in batch]
    if plan.controlnet:
        # A source's num_per_source jobs share one edge map: make it once per batch, not once per image.
        made = {job.source: plan.sources[job.source].control_image(plan.settings["resolution"], plan.settings["fit"])
                for job in batch}
        arguments["control_image"] = [np.round(made[job.source] * 255.0) / 255.0 for job in batch]
        for part, control in zip(parts, arguments["control_image"]):
            part.append(np.round(control * 255.0).astype(np.uint8).tobytes())
    hashes = [_condition_hash(part) if part else "" for part in parts]
    return arguments, prompts, hashes


def _write_job(output_dir: Path, plan: Plan, job: Job, image: np.ndarray, mask: np.ndarray | None, prompt: str,
               condition_hash: str, process_index: int) -> None:
    """Mask, then image, each renamed into place; the manifest line last, so it means the job is done."""
    source = plan.sources[job.source]
    mask_sha256 = write_array_png(mask.astype(np.uint8) * 255, output_dir / job.mask_file_name) \
        if job.mask_file_name else ""
    if plan.settings["channels"] == 1:
        image = to_channels(image, 1)[:, :, 0]
    sha256 = write_array_png(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), output_dir / job.file_name)
    extra = {"process_index": process_index, "number": job.number, "text": prompt or source.text,
             "label": source.label}
    if plan.controlnet:
        extra["edge_method"] = plan.settings["edge_method"]
    append_manifest(output_dir, ManifestEntry(
        file_name=job.file_name, seed=job.seed, model_dir=plan.settings["model_dir"],
        mask_file_name=job.mask_file_name, source_dataset=plan.settings["source_dir"] or "",
        source_file_name=source.file_name, source_split=source.split, source_sha256=source.image_sha256,
        prompt=prompt,
        condition_hash=condition_hash, sha256=sha256, mask_sha256=mask_sha256, extra=extra))


def my_batches(jobs: list[Job], batch_size: int, done: set[str], process_index: int,
               num_processes: int) -> list[list[Job]]:
    """This process's batches: the run's jobs cut into batches in order, batch b to process b % processes,
    keeping those with a job not yet done. A batch is always sampled whole (its done images are not written
    again), so each image comes from the same batch of seeds, and the same floating-point sums, however many
    processes share the run and wherever a killed run stopped."""
    batches = [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]
    return [batch for number, batch in enumerate(batches) if number % num_processes == process_index
            and any(job.file_name not in done for job in batch)]


def load_pipeline(plan: Plan, device):
    """The model folder as the pipeline of its generator family (for latent diffusion MedaugPipeline,
    MedaugMaskPipeline or MedaugControlNetPipeline, with the run's scheduler), on `device`."""
    from medaug.pipelines import (MedaugControlNetPipeline, MedaugGeneratorPipeline, MedaugMaskPipeline,
                                  MedaugPipeline, MedaugPix2PixPipeline)

    if plan.record.generator in ("pix2pix", *GENERATOR_FAMILIES):
        family = MedaugPix2PixPipeline if plan.record.generator == "pix2pix" else MedaugGeneratorPipeline
        pipeline = family.from_medaug(plan.settings["model_dir"])
        if family is MedaugGeneratorPipeline:
            pipeline.check_size(plan.settings["resolution"], plan.settings["resolution"])
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)
    pipeline_class = (MedaugControlNetPipeline if plan.controlnet else
                      MedaugMaskPipeline if plan.record.unet_mask_channels else MedaugPipeline)
    pipeline = pipeline_class.from_medaug(plan.settings["model_dir"], scheduler=plan.settings["scheduler"],
                                          base_model=plan.record.base_model)
    vae_scale = vae_downsampling(pipeline.vae)
    step = vae_scale * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    if plan.settings["resolution"] % step:
        raise ValueError(f"--resolution {plan.settings['resolution']}: must be a multiple of {step} for this model "
                         f"(VAE downsamples {vae_scale}x, UNet {step // vae_scale}x)")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def process_state():
    """accelerate's process state; without an accelerator, launched processes still form a CPU (gloo) group."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))


def generate(model_dir: str | Path | None, output_dir: str | Path, edges: str | Path | None = None,
             from_masks: str | Path | None = None, from_images: str | Path | None = None, prompt: str | None = None,
             embeddings_file: str | Path | None = None, split: str = "train", num_per_source: int = 1,
             num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = 3.0,
             controlnet_conditioning_scale: float = 1.0, scheduler: str = DEFAULT_SCHEDULER, seed: int = 0,
             batch_size: int | str = "auto", resolution: int | None = None, resume: bool = False,
             overwrite: bool = False, max_sources: int | None = None,
             base_model: str | Path | None = None, lora_weights: str | Path | None = None,
             controlnet: str | Path | None = None, precision: str = "auto", compile_model: bool = False,
             progress: Callable[[int], None] | None = None, on_start: Callable[[int], None] | None = None) -> dict:
    """Generate a synthetic dataset folder; return {written, skipped, total, seconds, images_per_second, ...}.

    Raises ValueError (or FileNotFoundError, FileExistsError) naming the flag or file at fault before any file
    is written. `precision` (medaug.speed.PRECISIONS): "auto" samples in bf16 autocast where the device computes
    bf16 natively; the resolved precision is recorded with the folder's settings. `batch_size` "auto" is chosen
    from the memory free once the model is loaded (medaug.speed.auto_batch_size). `compile_model` runs the UNet (and
    ControlNet) through torch.compile: a minute's compile that pays back only over long runs (benchmarks/RESULTS.md,
    "What each CPU option buys"); a last, smaller batch runs uncompiled rather than compile again. `on_start(jobs)`
    is told how many jobs this process has left, `progress(n)` as they finish.
    """
    batch_size = parse_batch_size(batch_size)
    output_dir = Path(output_dir)
    plan = plan_generation(model_dir, edges, from_masks, from_images, prompt,
                           str(embeddings_file) if embeddings_file else None, split, num_per_source,
                           num_inference_steps, guidance_scale, controlnet_conditioning_scale, scheduler, seed,
                           resolution, max_sources, base_model, lora_weights, controlnet)
    if compile_model and plan.record.generator != "latent_diffusion":
        raise ValueError(f"--compile: only latent diffusion models have a denoiser to compile; this is a "
                         f"{plan.record.generator} model, one cheap pass per image")
    refuse_input_folder(output_dir, {"--edges": edges, "--from_masks": from_masks, "--from_images": from_images,
                                     "--model_dir": model_dir})
    state = process_state()
    plan.settings["precision"] = generation_precision(plan.record, precision, state.device)
    with output_lock(output_dir, enabled=state.is_main_process):  # one run writes a folder at a time
        check_output_folder(output_dir, plan.settings, resume, overwrite, GROWABLE)
        return _generate_into(output_dir, plan, state, batch_size, compile_model, overwrite, progress, on_start)


def parse_batch_size(value: int | str) -> int | str:
    """A whole number of at least 1, or "auto" (a --config file's number may arrive as text)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--batch_size: expected a whole number or auto, got {value!r}") from None
    if number < 1 or str(value).strip() != str(number):
        raise ValueError(f"--batch_size must be a whole number of at least 1 or auto, got {value!r}")
    return number


def sampling_batch_size(batch_size: int | str, plan: Plan, pipeline, device) -> tuple[int, str]:
    """(images per batch, why): --batch_size as given, or "auto" from the model's size and the memory free now.
    The generators trained from nothing make an image in one small forward pass: "auto" gives them the cap."""
    if batch_size != "auto":
        return batch_size, "--batch_size"
    if plan.record.generator != "latent_diffusion":
        return auto_batch_size(0, device)[0], "auto: the cap (one small forward pass an image)"
    latent_pixels = (plan.settings["resolution"] // vae_downsampling(pipeline.vae)) ** 2
    per_image = sampling_bytes_per_image(latent_pixels, max(pipeline.unet.config.block_out_channels),
                                         plan.settings["precision"])
    return auto_batch_size(per_image, device)


def generation_precision(record: RunRecord, precision: str, device) -> str:
    """The precision a run samples at: --precision resolved for the device (medaug.speed) for latent diffusion;
    the generators trained from nothing (pix2pix and the like) are one cheap pass and stay fp32."""
    resolved = resolve_precision(precision, device)
    return resolved if record.generator == "latent_diffusion" else "fp32"


def compiled_denoisers(pipeline) -> tuple[dict, dict]:
    """(eager, compiled): the pipeline's UNet and ControlNet as loaded, and each through torch.compile."""
    import torch

    eager = {name: getattr(pipeline, name) for name in ("unet", "controlnet") if getattr(pipeline, name, None)}
    return eager, {name: torch.compile(module) for name, module in eager.items()}


def _generate_into(output_dir: Path, plan: Plan, state, batch_size: int | str, compile_model: bool, overwrite: bool,
                   progress: Callable[[int], None] | None, on_start: Callable[[int], None] | None) -> dict:
    import torch

    threads, thread_reason = choose_threads()
    loading = time.perf_counter()
    pipeline = load_pipeline(plan, state.device)
    load_seconds = time.perf_counter() - loading
    batch_size, batch_reason = sampling_batch_size(batch_size, plan, pipeline, state.device)
    eager, compiled = compiled_denoisers(pipeline) if compile_model else ({}, {})
    if state.is_main_process:
        prepare_output_folder(output_dir, plan.settings, overwrite,
                              masks=any(job.mask_file_name for job in plan.jobs))
    state.wait_for_everyone()
    done = finished_files(output_dir)
    mine = my_batches(plan.jobs, batch_size, done, state.process_index, state.num_processes)
    pending = sum(job.file_name not in done for batch in mine for job in batch)
    if on_start is not None:
        on_start(pending)
    started = time.perf_counter()
    for batch in mine:
        for name, module in (compiled if len(batch) == batch_size else eager).items():
            setattr(pipeline, name, module)  # a smaller last batch would compile once more
        arguments, prompts, hashes = _batch_inputs(plan, batch)
        generators = [torch.Generator().manual_seed(job.seed) for job in batch]
        extra = ({"controlnet_conditioning_scale": plan.settings["controlnet_conditioning_scale"]}
                 if plan.controlnet else {})
        with autocast(plan.settings["precision"], state.device):
            images = pipeline(**arguments, num_inference_steps=plan.settings["num_inference_steps"],
                              guidance_scale=plan.settings["guidance_scale"],
                              generator=generators, height=plan.settings["resolution"],
                              width=plan.settings["resolution"], output_type="np", **extra).images
        todo = [item for item in zip(batch, images, prompts, hashes) if item[0].file_name not in done]
        masks = {job.source: plan.sources[job.source].fitted_mask(plan.settings["resolution"], plan.settings["fit"])
                 for job, *_ in todo if job.mask_file_name}  # read once per source and batch
        for job, image, text, condition_hash in todo:
            _write_job(output_dir, plan, job, image, masks.get(job.source), text, condition_hash,
                       state.process_index)
        if progress is not None:
            progress(len(todo))
    state.wait_for_everyone()
    seconds = time.perf_counter() - started
    written = _total(state, pending)
    if state.is_main_process:
        write_metadata(output_dir)
    return {"written": written, "skipped": sum(job.file_name in done for job in plan.jobs),
            "total": len(plan.jobs), "seconds": seconds, "images_per_second": written / seconds if seconds > 0 else 0.0,
            "load_seconds": load_seconds, "processes": state.num_processes, "output_dir": str(output_dir),
            "batch_size": batch_size, "batch_size_reason": batch_reason, "compiled": bool(compiled),
            "precision": plan.settings["precision"], "torch_threads": threads, "torch_threads_reason": thread_reason,
            "manifest": str(output_dir / MANIFEST_NAME)}


def _total(state, count: int) -> int:
    """`count` summed over the launched processes."""
    if state.num_processes == 1:
        return count
    from accelerate.utils import gather_object

    return int(sum(gather_object([count])))

