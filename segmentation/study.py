"""A study: arms × real fractions × synthetic ratios × seeds, each run trained once and saved, then a report.

The arms are those of `medaug.segmentation.arms` (real, real+classical, real+synthetic, real+classical+synthetic,
synthetic_pretrain, synthetic), and every run of every arm takes the same number of optimiser steps (`steps`), so
arms differ in their data and augmentation, never in their updates. The +synthetic arms add `ratio` × as many
synthetic images as real ones.

Runs with the same seed share their real subset, and synthetic samples are nested (the images at ratio 0.5
are among those at ratio 1), so differences between arms come from the arm and not from the draw. Every run
writes `runs/<run_id>/result.json` when it finishes (atomically), and a study started again on the same
output folder skips those runs: an interrupted study resumes, and a study given more seeds, ratios or arms
only trains what is new. Settings that change what a run means (data, network, steps...) must match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medaug.data import FIT_MODES
from medaug.files import write_json_atomic
from medaug.outputs import OutputFolderError, refuse_foreign_entries, refuse_input_folder
from medaug.records import RERUN_ADVICE, RecordError, read_record
from medaug.segmentation.arms import ARMS, SYNTHETIC_ARMS, arm_spec
from medaug.segmentation.inputs import StudyData, StudyError, load_study_data
from medaug.segmentation.networks import DEFAULT_NETWORK, check_resolution, network_spec
from medaug.segmentation.train_seg import SegRecipe
from medaug.speed import choose_threads

RATIO_ARMS = tuple(arm for arm in SYNTHETIC_ARMS if ARMS[arm].real)
CLASSIFICATION_ARMS = tuple(arm for arm, spec in ARMS.items() if not spec.pretrain)
DEFAULT_LEARNING_RATE = {"seg": 1e-3, "cls": 3e-4}
STUDY_FILE = "study.json"
OVERLAY_IMAGES = 4  # test images each segmentation run's predictions are saved for, for the report
OVERLAY_FILE = "overlay_predictions.npz"
# Settings that change what a finished run means; a resumed study must keep them.
FIXED_SETTINGS = ("task", "data", "synthetic", "images", "network", "resolution", "channels", "fit", "steps",
                  "batch_size", "learning_rate", "schedule", "select", "label_column")


@dataclass(frozen=True)
class Run:
    arm: str
    real_fraction: float  # 0 for the synthetic-only arm
    ratio: float  # synthetic images per real image; 0 for arms without synthetic data
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.arm.replace('+', '-')}_f{self.real_fraction:g}_r{self.ratio:g}_s{self.seed}"


def default_arms(with_synthetic: bool) -> list[str]:
    if not with_synthetic:
        return ["real", "real+classical"]
    return ["real", "real+classical", "real+synthetic", "real+classical+synthetic", "synthetic"]


def plan_runs(arms: Sequence[str], real_fractions: Sequence[float], ratios: Sequence[float], seeds: int) -> list[Run]:
    """Every run of the study, seed by seed, so an early stop still leaves complete comparisons."""
    runs = []
    for seed in range(seeds):
        if "synthetic" in arms:
            runs.append(Run("synthetic", 0.0, 0.0, seed))
        for fraction in real_fractions:
            for arm in arms:
                if arm in RATIO_ARMS:
                    runs.extend(Run(arm, fraction, ratio, seed) for ratio in ratios)
                elif arm != "synthetic":
                    runs.append(Run(arm, fraction, 0.0, seed))
    return runs


def check_plan(task: str, arms: Sequence[str], real_fractions: Sequence[float], ratios: Sequence[float],
               seeds: int, steps: int, with_synthetic: bool) -> None:
    """Refuse a plan that cannot run, naming the flag."""
    known = ARMS if task == "seg" else CLASSIFICATION_ARMS
    unknown = [arm for arm in arms if arm not in known]
    if unknown or not arms:
        raise StudyError(f"--arms: unknown or no {task} arm(s) {unknown}; expected some of {', '.join(known)}")
    needing = [arm for arm in arms if arm in SYNTHETIC_ARMS]
    if needing and not with_synthetic:
        raise StudyError(f"--arms: {', '.join(needing)} need synthetic images; pass --synthetic SYN_DIR")
    if any(not 0 < fraction <= 1 for fraction in real_fractions) or not real_fractions:
        raise StudyError(f"--real_fractions: each must be in (0, 1], got {list(real_fractions)}")
    if any(not ratio > 0 for ratio in ratios) or (not ratios and any(a in RATIO_ARMS for a in arms)):
        raise StudyError(f"--synthetic_ratios: each must be above 0, got {list(ratios)}")
    if seeds < 1:
        raise StudyError(f"--seeds: at least 1, got {seeds}")
    if steps < 1:
        raise StudyError(f"--steps: at least 1, got {steps}")
    if task not in DEFAULT_NETWORK:
        raise StudyError(f"task must be one of {', '.join(DEFAULT_NETWORK)}, got '{task}'")


def real_subset(items: list[dict], fraction: float, seed: int) -> list[dict]:
    """A stratified (by label) random `fraction` of `items`, at least one per label; nested across fractions."""
    if fraction >= 1:
        return list(items)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item["label_name"], []).append(item)
    chosen = []
    for name in sorted(groups):
        group = groups[name]
        order = rng.permutation(len(group))
        chosen += [group[i] for i in order[:max(1, round(fraction * len(group)))]]
    return chosen


def synthetic_sample(items: list[dict], count: int, seed: int) -> list[dict]:
    """The first `count` of a seeded permutation: samples for growing ratios are nested."""
    order = np.random.default_rng([seed, 1]).permutation(len(items))
    return [items[i] for i in order[:count]]


def training_items(data: StudyData, run: Run) -> tuple[list[dict], list[dict]]:
    """(real, synthetic) training items of one run."""
    if not arm_spec(run.arm).real:
        return [], list(data.synthetic)
    real = real_subset(data.train, run.real_fraction, run.seed)
    if run.arm not in RATIO_ARMS:
        return real, []
    return real, synthetic_sample(data.synthetic, round(run.ratio * len(real)), run.seed)


def run_study(
    task: str,
    real_dir: str | Path,
    output_dir: str | Path,
    synthetic_dirs: Sequence[str | Path] = (),
    network: str | None = None,
    resolution: int = 128,
    channels: int = 1,
    fit: str = SegRecipe.fit,
    steps: int = SegRecipe.steps,
    batch_size: int = SegRecipe.batch_size,
    learning_rate: float | None = None,
    schedule: str = SegRecipe.schedule,
    select: str = SegRecipe.select,
    seeds: int = 3,
    synthetic_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    real_fractions: Sequence[float] = (1.0,),
    arms: Sequence[str] | None = None,
    label_column: str = "label",
    device: str = "auto",
    gradcam_images: int = 4,
    num_threads: int | None = None,
    on_progress: Callable[[float, int, str], None] | None = None,
    allow_unknown_provenance: bool = False,
) -> dict:
    """Check the inputs, train every unfinished run, and write results.json, results.md and plots.
    `allow_unknown_provenance`: use synthetic rows no manifest line vouches for, noting the risk in the report."""
    from medaug.segmentation.common import resolve_device
    from medaug.segmentation.report import write_report

    network = network or DEFAULT_NETWORK.get(task, "")
    arms = list(arms) if arms else default_arms(bool(synthetic_dirs))
    check_plan(task, arms, real_fractions, synthetic_ratios, seeds, steps, bool(synthetic_dirs))
    _check_settings(task, network, resolution, channels, fit, batch_size)
    try:
        torch_device = resolve_device(device)
    except ValueError as error:
        raise StudyError(str(error)) from error
    if num_threads is not None:
        _set_threads(num_threads)
    else:
        choose_threads()  # as many as cores are idle (medaug.speed)
    data = load_study_data(task, real_dir, list(synthetic_dirs), label_column=label_column,
                           allow_unknown_provenance=allow_unknown_provenance)
    settings = {
        "task": task, "data": str(Path(real_dir).resolve()),
        "synthetic": [str(Path(d).resolve()) for d in synthetic_dirs], "network": network,
        "resolution": resolution, "channels": channels, "fit": fit, "steps": steps, "batch_size": batch_size,
        "learning_rate": learning_rate or DEFAULT_LEARNING_RATE[task], "schedule": schedule, "select": select,
        "label_column": label_column,
        # a folder that gained or lost images since its runs finished would make them incomparable
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                   "synthetic": len(data.synthetic)},
    }
    if task == "seg":
        try:
            recipe_from_settings(settings).check()
        except ValueError as error:
            raise StudyError(str(error)) from error
    output_dir = Path(output_dir)
    runs = plan_runs(arms, real_fractions, synthetic_ratios, seeds)
    _open_output(output_dir, settings, runs)
    notes = list(data.notes)
    results = []
    for number, run in enumerate(runs):
        result = load_run_result(output_dir, run)
        if result is None:
            result = _train_run(data, run, settings, output_dir, torch_device, gradcam_images,
                                _step_reporter(on_progress, number, len(runs), run, steps))
        else:
            result["resumed"] = True
        if result["n_train_synthetic"] < result["n_train_synthetic_requested"]:
            notes.append(f"{run.run_id}: asked for {result['n_train_synthetic_requested']} synthetic images, "
                         f"the synthetic folders hold {result['n_train_synthetic']}")
        results.append(result)
        if on_progress is not None:
            on_progress(number + 1, len(runs), f"{number + 1}/{len(runs)} runs done")
    return write_report(output_dir, settings, data, results, notes)


def _check_settings(task: str, network: str, resolution: int, channels: int, fit: str, batch_size: int) -> None:
    try:
        network_spec(task, network)
        check_resolution(task, network, resolution)
    except ValueError as error:
        raise StudyError(str(error)) from error
    if channels not in (1, 3):
        raise StudyError(f"--channels: 1 or 3, got {channels}")
    if fit not in FIT_MODES:
        raise StudyError(f"--fit: one of {', '.join(FIT_MODES)}, got '{fit}'")
    if batch_size < 1:
        raise StudyError(f"--batch_size: at least 1, got {batch_size}")


def _set_threads(num_threads: int) -> None:
    """Torch's CPU threads for the whole process. On a busy machine one thread can beat two: threads that wait
    on each other for a core lose more than they gain."""
    import torch

    if num_threads < 1:
        raise StudyError(f"--num_threads: at least 1, got {num_threads}")
    torch.set_num_threads(num_threads)


def _open_output(output_dir: Path, settings: dict, runs: list[Run]) -> None:
    """Create the output folder, or reopen one whose fixed settings match; record the plan."""
    path = output_dir / STUDY_FILE
    if not path.is_file():  # no bench study here: the folder must hold nothing of the user's
        refuse_new_output(output_dir, settings)
    if path.is_file():
        previous = json.loads(path.read_text())["settings"]
        changed = [f"{key} (was {previous.get(key)!r}, now {settings[key]!r})"
                   for key in FIXED_SETTINGS if previous.get(key) != settings[key]]
        if changed:
            raise StudyError(f"--output_dir {output_dir}: holds a study with other settings: {'; '.join(changed)}. "
                             "Its finished runs would not compare; choose a new --output_dir")
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"settings": settings, "runs": [r.run_id for r in runs]})


def refuse_new_output(output_dir: Path, settings: dict) -> None:
    """A new study goes into an empty folder that is none of its inputs (results.json, report.html... would
    replace the user's files of those names)."""
    try:
        refuse_input_folder(output_dir, [("--data", settings["data"]),
                                         *(("--synthetic", synthetic) for synthetic in settings["synthetic"])])
        refuse_foreign_entries(output_dir, "medaug bench")
    except OutputFolderError as error:
        raise StudyError(str(error)) from error


# What a finished run's result.json must hold, as the report reads it back.
RESULT_FIELDS = {"run_id": "str", "arm": "str", "real_fraction": "float", "ratio": "float", "seed": "int",
                 "n_train_real": "int", "n_train_synthetic": "int", "n_train_synthetic_requested": "int",
                 "steps": "int", "seconds": "float", "metrics": "dict"}


def load_run_result(output_dir: Path, run: Run) -> dict | None:
    """The saved result of a finished run, or None if it has not finished."""
    path = output_dir / "runs" / run.run_id / "result.json"
    if not path.is_file():
        return None
    try:
        return read_record(path, RESULT_FIELDS, RERUN_ADVICE)
    except RecordError as error:
        raise StudyError(str(error)) from None


def overlay_items(test: list[dict], count: int = OVERLAY_IMAGES) -> list[dict]:
    """The first test images with a lesion: every arm's predictions are shown on these same images."""
    from medaug.data import load_mask

    chosen = []
    for item in test:
        if len(chosen) == count:
            break
        if item.get("mask") and load_mask(item["mask"]).any():
            chosen.append(item)
    return chosen


def save_overlay_predictions(model, items: list[dict], path: Path, resolution: int, channels: int, fit: str,
                             device) -> None:
    """The model's masks (at `resolution`, squared by `fit`) for `items`, with their file names."""
    import torch

    from medaug.segmentation.common import evaluation_batches

    if not items:
        return
    model.eval()
    with torch.no_grad():
        batches = evaluation_batches(items, resolution, channels, fit, True, len(items))
        masks = np.concatenate([model(b["image"].to(device)).argmax(dim=1).cpu().numpy().astype(bool)
                                for b in batches])
    np.savez_compressed(path, masks=masks, file_names=np.array([item["file_name"] for item in items], dtype=str))


def recipe_from_settings(settings: dict):
    """The segmentation recipe every arm of this study trains with."""
    return SegRecipe(**{key: settings[key] for key in ("steps", "resolution", "network", "channels", "fit",
                                                        "batch_size", "learning_rate", "schedule", "select")})


def _train_run(data: StudyData, run: Run, settings: dict, output_dir: Path, device, gradcam_images: int,
               on_step) -> dict:
    import torch

    from medaug.segmentation.arms import train_seg_arm
    from medaug.segmentation.train_cls import train_classification

    real, synthetic = training_items(data, run)
    run_dir = output_dir / "runs" / run.run_id
    if settings["task"] == "seg":
        recipe = recipe_from_settings(settings)

        def save_predictions(model) -> None:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_overlay_predictions(model, overlay_items(data.test), run_dir / OVERLAY_FILE, recipe.resolution,
                                     recipe.channels, recipe.fit, torch.device(device))

        outcome = train_seg_arm(run.arm, real, synthetic, data.val, data.test, recipe, run.seed, device, on_step,
                                save_predictions)
    else:
        outcome = train_classification(
            real + synthetic, data.val, data.test, data.classes, network=settings["network"],
            resolution=settings["resolution"], channels=settings["channels"], fit=settings["fit"],
            steps=settings["steps"], batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
            seed=run.seed, augment=arm_spec(run.arm).augment, device=device, gradcam_dir=run_dir / "gradcam",
            gradcam_images=gradcam_images, on_step=on_step)
    requested = len(data.synthetic) if not arm_spec(run.arm).real else round(run.ratio * len(real))
    result = {"run_id": run.run_id, **asdict(run), "n_train_real": len(real), "n_train_synthetic": len(synthetic),
              "n_train_synthetic_requested": requested, **outcome}
    write_json_atomic(run_dir / "result.json", result)
    return result


def _step_reporter(on_progress, number: int, total: int, run: Run, steps: int):
    if on_progress is None:
        return None

    def report(step: int, loss: float) -> None:
        if step % 10 and step != steps:
            return
        description = f"run {number + 1}/{total} {run.run_id} step {step}/{steps} loss {loss:.3f}"
        on_progress(number + step / steps, total, description)

    return report
