"""`medaug study seg`: does synthetic data help a segmenter when labels are scarce? Asked fairly.

For each real fraction: a stratified subset (nested across fractions, whole patients) written as its own folder;
every generator trained on that folder only; pairs generated for its masks (or for new mask shapes made from them,
`mask_augment`), scored by a segmenter trained on the subset and optionally filtered by that score; then the arms,
each trained for the same number of optimiser steps over `seeds` seeds and scored on the real test split:

- `real`: the subset alone, with flips (the yardstick); `real+classical`: with classical augmentation;
- `real+synthetic`, `real+classical+synthetic`: plus `synthetic_ratio` x as many synthetic pairs;
- `synthetic_pretrain`: half the steps on synthetic pairs, then half on the subset;
- `synthetic`: synthetic pairs only (train on synthetic, test on real); not run unless asked for.

The arms are `medaug.segmentation.arms`' and train through its `train_seg_arm`, as `medaug bench` and the demo do.
With `subset_draws` above 1 the whole chain runs again on independent subsets (draw d uses subset seed
`subset_seed + d`, with generators of its own), so the report's paired differences cover the luck of the draw too.

Every stage leaves a file that marks it finished (a subset's metadata.csv, a run's medaug_args.json, a synthetic
folder's manifest, a run's result.json), so a study started again on its output folder goes on where it stopped, and
a generator is trained once per subset and used by every seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from medaug.data.folder import DatasetError, DatasetFolder, is_dataset_folder
from medaug.data.validation import ValidationSplit, ensure_validation
from medaug.files import write_json_atomic
from medaug.outputs import OutputFolderError, refuse_foreign_entries, refuse_input_folder
from medaug.records import RERUN_ADVICE, RecordError, read_record
from medaug.lowdata.filter import FilterRule, keep_pairs
from medaug.lowdata.generators import GENERATORS, GeneratorSettings, generate_pairs, train_generator
from medaug.lowdata.subsets import subset_name, write_nested_subsets
from medaug.segmentation.arms import ARMS, SYNTHETIC_ARMS
from medaug.segmentation.train_seg import SegRecipe
from medaug.speed import choose_threads

DEFAULT_ARMS = ("real", "real+classical", "real+synthetic", "real+classical+synthetic", "synthetic_pretrain")
UNLABELLED = ("labelled", "all")
SETTINGS_FILE = "study_settings.json"
GROWABLE = ("real_fractions", "seeds", "arms", "generators", "subset_draws")  # a resumed study may grow these
OVERLAY_IMAGES = 4


class LowDataStudyError(ValueError):
    """The study cannot run as asked; the message names the flag or folder."""


@dataclass(frozen=True)
class LowDataSettings:
    real_fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    seeds: int = 3
    subset_draws: int = 1
    generators: tuple[str, ...] = ("mask_channels", "pix2pix")
    arms: tuple[str, ...] = DEFAULT_ARMS
    synthetic_ratio: float = 1.0
    mask_augment: bool = False
    filter: str | None = None
    unlabelled_images: str = "labelled"
    seg_steps: int = SegRecipe.steps
    seg_resolution: int = SegRecipe.resolution
    seg_batch_size: int = SegRecipe.batch_size
    seg_learning_rate: float = SegRecipe.learning_rate
    subset_seed: int = 0
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)

    @classmethod
    def quick(cls, **overrides) -> LowDataSettings:
        """Every stage, tiny: for tests and a first look (minutes on a CPU), measures nothing."""
        tiny = GeneratorSettings(preset="tiny", vae_steps=4, base_steps=4, diffusion_steps=4, controlnet_steps=4,
                                 pix2pix_steps=4, autoencoder_steps=4, gan_steps=4, batch_size=4,
                                 segmenter_epochs=2, inference_steps=2)
        return cls(**{"seeds": 1, "seg_steps": 6, "seg_batch_size": 4, "seg_resolution": 64, "generator": tiny,
                      **overrides})

    def seg_recipe(self) -> SegRecipe:
        """The recipe every arm trains with (the engine's defaults for what the study does not set)."""
        return SegRecipe(steps=self.seg_steps, resolution=self.seg_resolution, batch_size=self.seg_batch_size,
                         learning_rate=self.seg_learning_rate)

    def check(self) -> None:
        """Refuse settings that cannot run, naming the flag."""
        problems = {
            "--real_fractions": not self.real_fractions or any(not 0 < f <= 1 for f in self.real_fractions),
            "--seeds": self.seeds < 1,
            "--subset_draws": self.subset_draws < 1,
            "--generators": any(g not in GENERATORS for g in self.generators),
            "--arms": not self.arms or any(a not in ARMS for a in self.arms),
            "--synthetic_ratio": not self.synthetic_ratio > 0,
            "--unlabelled_images": self.unlabelled_images not in UNLABELLED,
            "--seg_steps": self.seg_steps < 2,
        }
        for flag, bad in problems.items():
            if bad:
                value = getattr(self, flag[2:])
                raise LowDataStudyError(f"{flag}: cannot use {value!r} (arms: {', '.join(ARMS)}; generators: "
                                        f"{', '.join(GENERATORS)}; --unlabelled_images: {' or '.join(UNLABELLED)})")
        if any(a in SYNTHETIC_ARMS for a in self.arms) and not self.generators:
            raise LowDataStudyError("--generators: the synthetic arms need at least one generator")
        try:
            self.seg_recipe().check()
        except ValueError as error:
            raise LowDataStudyError(str(error).replace("--resolution", "--seg_resolution")) from error
        if self.filter is not None:
            try:
                FilterRule.parse(self.filter)
            except ValueError as error:
                raise LowDataStudyError(str(error)) from error


@dataclass(frozen=True)
class Arm:
    name: str
    generator: str | None  # None for the arms without synthetic data
    fraction: float

    @property
    def key(self) -> str:
        name = self.name.replace("+", "-")
        return f"{subset_name(self.fraction)}_{name}" + (f"_{self.generator}" if self.generator else "")


def draw_name(draw: int) -> str:
    return f"d{draw}"


def plan_arms(settings: LowDataSettings) -> list[Arm]:
    arms = []
    for fraction in settings.real_fractions:
        for name in settings.arms:
            generators = settings.generators if name in SYNTHETIC_ARMS else (None,)
            arms += [Arm(name, generator, fraction) for generator in generators]
    return arms


# ---- stages ------------------------------------------------------------------------------------------------


def open_study(output_dir: Path, data: Path, settings: LowDataSettings) -> None:
    """Create the folder, or reopen one made with the same data and settings (refused otherwise). More fractions,
    seeds, arms or generators may be asked for: what is finished keeps its meaning, and only what is new runs."""
    recorded = {"data": str(data.resolve()), "settings": json.loads(json.dumps(asdict(settings)))}
    path = output_dir / SETTINGS_FILE
    if not path.is_file():  # a new study: an empty folder that is not the dataset
        try:
            refuse_input_folder(output_dir, {"--data": data})
            refuse_foreign_entries(output_dir, "medaug study")
        except OutputFolderError as error:
            raise LowDataStudyError(str(error)) from error
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(key for key in recorded["settings"] if key not in GROWABLE and
                         previous["settings"].get(key) != recorded["settings"][key])
        changed += ["data"] if previous["data"] != recorded["data"] else []
        if changed:
            raise LowDataStudyError(f"--output_dir {output_dir}: holds a study with other {', '.join(changed)}; "
                                    "its finished stages would not compare, so choose a new --output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, recorded, indent=2)


def scorer_for(subset: Path, work: Path, settings: LowDataSettings):
    """The segmenter (seed `subset_seed`) that scores and filters the pairs; trained on the subset once."""
    from medaug.metrics.fidelity import SEGMENTER_CONFIG, FidelitySegmenter, train_fidelity_segmenter

    folder = work / "scorer"
    if (folder / SEGMENTER_CONFIG).is_file():
        return FidelitySegmenter.load(folder)
    segmenter = train_fidelity_segmenter(subset, settings.generator.resolution, settings.generator.segmenter_epochs,
                                         settings.subset_seed)
    segmenter.save(folder)
    return segmenter


def mask_source(subset: Path, work: Path, wanted: int, settings: LowDataSettings) -> Path:
    """The folder whose training masks the generators draw for: the subset's own, or new shapes made from them."""
    from medaug.data.mask_augment import write_mask_dataset

    if not settings.mask_augment:
        return subset
    folder = work / "new_masks"
    if not (folder / "metadata.csv").is_file():
        rows = max(1, len(DatasetFolder(subset).indices("train")))  # new masks come from lesion rows only
        write_mask_dataset(subset, folder, max(1, math.ceil(wanted / rows)), settings.generator.resolution,
                           seed=settings.subset_seed)
    return folder


def synthetic_pairs(generator: str, subset: Path, work: Path, synthetic_dir: Path, wanted: int, scorer,
                    settings: LowDataSettings, unlabelled: Path | None) -> dict:
    """Train, generate, score and (optionally) filter one generator's pairs; the outcome is kept in pairs.json."""
    from medaug.metrics.fidelity import label_fidelity, record_in_manifest

    record_path = synthetic_dir / "pairs.json"
    if record_path.is_file():
        return _read_back(record_path, PAIRS_FIELDS, "; delete that folder to generate its pairs again")
    run_dir = train_generator(generator, subset, work, settings.generator, unlabelled)
    # With a filter, generate twice as many so that about as many remain after it.
    count = wanted * (2 if settings.filter else 1)
    generated = generate_pairs(run_dir, mask_source(subset, work, count, settings), synthetic_dir, count,
                               settings.generator)
    fidelity = label_fidelity(scorer, synthetic_dir)
    record_in_manifest(synthetic_dir, fidelity["per_pair"])
    if settings.filter:
        kept, acceptance = keep_pairs(fidelity["per_pair"], FilterRule.parse(settings.filter))
    else:
        kept, acceptance = {pair["file_name"] for pair in fidelity["per_pair"]}, None
    record = {"generator": generator, "run_dir": str(run_dir), "generated": generated,
              "fidelity": {key: fidelity[key] for key in ("synthetic_dice", "real_dice", "ratio", "share_above_0_5",
                                                          "pairs")},
              "dice": [pair["dice"] for pair in fidelity["per_pair"] if pair["lesion"]],
              "filter": acceptance, "kept": sorted(kept)}
    write_json_atomic(record_path, record)
    return record


# What the study reads back from a finished stage, checked before the summary trusts it.
PAIRS_FIELDS = {"generator": "str", "run_dir": "str", "generated": "dict", "fidelity": "dict", "dice": "list",
                "filter": "dict | None", "kept": "list"}
RESULT_FIELDS = {"arm": "str", "generator": "str | None", "real_fraction": "float", "draw": "int", "seed": "int",
                 "n_real": "int", "n_synthetic": "int", "steps": "int", "seconds": "float", "per_image": "dict",
                 "metrics": "dict", "history": "dict"}


def _read_back(path: Path, fields: dict[str, str], advice: str) -> dict:
    try:
        return read_record(path, fields, advice)
    except RecordError as error:
        raise LowDataStudyError(str(error)) from None


def run_arm(arm: Arm, seed: int, data, synthetic: list[dict], settings: LowDataSettings, run_dir: Path,
            draw: int = 0) -> dict:
    """Train one arm at one seed for `seg_steps` optimiser steps and score it on the real test split."""
    from medaug.segmentation.arms import train_seg_arm
    from medaug.segmentation.study import save_overlay_predictions, synthetic_sample

    result_path = run_dir / "result.json"
    if result_path.is_file():
        return _read_back(result_path, RESULT_FIELDS, RERUN_ADVICE)
    recipe = settings.seg_recipe()
    extra = synthetic_sample(synthetic, round(settings.synthetic_ratio * len(data.train)), seed) if arm.generator \
        else []

    def save_predictions(model) -> None:
        save_overlay_predictions(model, _overlay_items(data.test), run_dir / "overlay_predictions.npz",
                                 recipe.resolution, recipe.channels, recipe.fit, "cpu")

    outcome = train_seg_arm(arm.name, data.train, extra, data.val, data.test, recipe, seed, on_model=save_predictions)
    result = {"arm": arm.name, "generator": arm.generator, "real_fraction": arm.fraction, "draw": draw, "seed": seed,
              "n_real": len(data.train) if ARMS[arm.name].real else 0, "n_synthetic": len(extra),
              "steps": recipe.steps, "seconds": outcome["seconds"], "per_image": outcome["per_image"],
              "metrics": outcome["metrics"], "history": outcome["history"]}
    write_json_atomic(result_path, result)
    return result


def _overlay_items(test: list[dict]) -> list[dict]:
    """The first test images with a lesion: every arm's prediction is shown on these same images."""
    from medaug.segmentation.study import overlay_items

    return overlay_items(test, OVERLAY_IMAGES)


# ---- the study ---------------------------------------------------------------------------------------------


def run_subset(draw: int, fraction: float, subset: Path, output_dir: Path, settings: LowDataSettings,
               unlabelled: Path | None, say: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """One subset's generators, pairs and arms: ({(draw, fraction, generator): pairs record}, [run results])."""
    from medaug.segmentation.inputs import load_study_data

    place = f"{draw_name(draw)}/{subset_name(fraction)}"
    work = output_dir / "generators" / place
    real = load_study_data("seg", subset)
    wanted = math.ceil(settings.synthetic_ratio * len(real.train))
    scorer = scorer_for(subset, work, settings)
    pairs, synthetic = {}, {}
    for generator in settings.generators:
        say(f"{place}: generator {generator}")
        synthetic_dir = output_dir / "synthetic" / place / generator
        record = synthetic_pairs(generator, subset, work, synthetic_dir, wanted, scorer, settings, unlabelled)
        pairs[(draw, fraction, generator)] = record
        kept = set(record["kept"])
        items = load_study_data("seg", subset, [synthetic_dir]).synthetic
        synthetic[generator] = [item for item in items if item["file_name"] in kept]
    results = []
    for arm in [arm for arm in plan_arms(settings) if arm.fraction == fraction]:
        for seed in range(settings.seeds):
            say(f"{draw_name(draw)} {arm.key} seed {seed}")
            run_dir = output_dir / "runs" / f"{draw_name(draw)}_{arm.key}_s{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            results.append(run_arm(arm, seed, real, synthetic.get(arm.generator, []), settings, run_dir, draw))
    return pairs, results


def run_lowdata_study(data: str | Path, output_dir: str | Path, settings: LowDataSettings,
                      on_stage: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) every stage and write summary.json, results.md and report.html; return the summary."""
    from medaug.lowdata.summary import write_outputs

    settings.check()
    choose_threads()  # as many as cores are idle (medaug.speed)
    data, output_dir = Path(data), Path(output_dir)
    if not is_dataset_folder(data):
        raise LowDataStudyError(f"--data: {data} holds no metadata.csv, metadata.jsonl or split folders with one")
    open_study(output_dir, data, settings)
    say = on_stage or (lambda text: None)
    validation = source_validation(data)
    unlabelled = data if settings.unlabelled_images == "all" else None
    pairs, results, subsets = {}, [], {}
    for draw in range(settings.subset_draws):
        say(f"{draw_name(draw)}: subsets")
        drawn = write_nested_subsets(data, output_dir / "subsets" / draw_name(draw), list(settings.real_fractions),
                                     settings.subset_seed + draw)
        subsets.update({(draw, fraction): path for fraction, path in drawn.items()})
        for fraction, subset in drawn.items():
            draw_pairs, draw_results = run_subset(draw, fraction, subset, output_dir, settings, unlabelled, say)
            pairs.update(draw_pairs)
            results += draw_results
    say("report")
    return write_outputs(output_dir, settings, results, pairs, subsets, validation)


def source_validation(data: Path) -> ValidationSplit:
    """Where the study's val rows come from (`write_nested_subsets` carves the same ones into every subset)."""
    try:
        return ensure_validation(DatasetFolder(data))
    except DatasetError as error:
        raise LowDataStudyError(f"--data {error}") from error


def settings_from_flags(quick: bool, **flags) -> LowDataSettings:
    """Settings from the command line: flags left as None keep the default (or --quick's) value."""
    given = {key: value for key, value in flags.items() if value is not None}
    generator_keys = {item for item in GeneratorSettings.__dataclass_fields__}
    generator_overrides = {key: given.pop(key) for key in list(given) if key in generator_keys}
    settings = LowDataSettings.quick() if quick else LowDataSettings()
    settings = replace(settings, **given)
    return replace(settings, generator=replace(settings.generator, **generator_overrides))
