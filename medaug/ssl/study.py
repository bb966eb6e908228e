"""The self-supervised study: methods x policies x pools x seeds, each encoder scored by a probe, beside a
supervised baseline on the same network and labels, all on the real test split.

Pre-training reads the pool's images only (the real training split, and with `synthetic` also a synthetic
folder's images); labels are read afterwards, for the probe and the baseline. Every run leaves
`runs/<name>/result.json` (and its encoder beside it) when it is done, so a stopped study resumes where it
stopped, and a rerun may add methods, policies or seeds; other changed settings are refused.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from medaug.data import DatasetError, DatasetFolder
from medaug.data.validation import ValidationSplit, ensure_validation
from medaug.files import write_json_atomic
from medaug.records import RERUN_ADVICE, RecordError, read_record
from medaug.outputs import OutputFolderError, refuse_foreign_entries, refuse_input_folder
from medaug.ssl.policies import Policy, clahe, parse_policies
from medaug.ssl.pretrain import METHODS, PretrainSettings, initial_encoder, pretrain
from medaug.ssl.probe import (Classifier, classification_scores, encode, fit_probe, predict, train_supervised)

SETTINGS_NAME = "ssl_settings.json"
# Settings a resumed study may change: more of each is more runs, not other runs.
GROWABLE = ("methods", "policies", "seeds", "synthetic_policies", "gradcam_images")


BASELINES = ("supervised", "random")  # the same network trained on the labels; left as initialised
NO_POLICY = Policy("none", ())


class SslStudyError(ValueError):
    """Bad flags or data for the study; the message names the flag, folder or column."""


@dataclass
class SslSettings:
    methods: tuple[str, ...] = METHODS
    policies: str = "geometric,blur,occlusion,all"
    clahe: bool = False
    label_column: str = "label"
    positive_label: str | None = None  # a glob: the task becomes matching vs the rest
    ignore_labels: tuple[str, ...] = ()  # rows with these labels are left out of the probe (still pre-trained on)
    synthetic: str | None = None
    synthetic_policies: str | None = None  # default: the first of `policies`
    allow_unknown_provenance: bool = False
    resolution: int = 96
    fit: str = "pad"
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    supervised_policy: str = "geometric"
    supervised_steps: int = 300
    gradcam_images: int = 4


@dataclass
class Run:
    method: str  # simclr, byol or supervised
    policy: Policy
    pool: str  # real or real+synthetic
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.policy.name}-{self.pool}-seed{self.seed}"


@dataclass
class LabelledData:
    """Images of the real set by split, their class indices (-1: no usable label) and the class names."""

    images: dict[str, torch.Tensor]
    labels: dict[str, np.ndarray]
    classes: list[str]
    names: dict[str, list[str]]
    validation: ValidationSplit  # the probe's val rows: the dataset's own split, or carved from train


def plan_runs(settings: SslSettings) -> list[Run]:
    policies = parse_policies(settings.policies)
    synthetic = parse_policies(settings.synthetic_policies or policies[0].name) if settings.synthetic else []
    runs = [Run(method, policy, "real", seed) for method in settings.methods for policy in policies
            for seed in settings.seeds]
    runs += [Run(method, policy, "real+synthetic", seed) for method in settings.methods for policy in synthetic
             for seed in settings.seeds]
    supervised = parse_policies(settings.supervised_policy)[0]
    return runs + [Run(baseline, supervised if baseline == "supervised" else NO_POLICY, "real", seed)
                   for baseline in BASELINES for seed in settings.seeds]


def load_images(folder, rows: list[int], settings: SslSettings) -> torch.Tensor:
    """(N, 1, R, R) images in [0, 1], CLAHE-equalised when the settings say so."""
    from medaug.data import fit_square, load_image

    images = np.stack([fit_square(load_image(folder.path(i, "file_name"), 1, folder.slice_index(i)),
                                  settings.resolution, settings.fit) for i in rows])
    tensor = torch.from_numpy(images.reshape(len(rows), settings.resolution, settings.resolution, 1)
                              ).permute(0, 3, 1, 2).contiguous().float()
    return clahe(tensor) if settings.clahe else tensor


def unlabelled_pool(data_dir: Path, settings: SslSettings, with_synthetic: bool) -> torch.Tensor:
    """The images pre-training sees: the real training split (and the synthetic folder's rows, checked for
    test-split sources and provenance as every study checks them). No label is read."""
    from medaug.segmentation.inputs import synthetic_pool

    real, _ = open_with_validation(data_dir, settings, log=False)
    pools = [load_images(real, real.indices("train"), settings)]
    if with_synthetic:
        synthetic, _ = synthetic_pool(settings.synthetic, data_dir, settings.allow_unknown_provenance)
        pools.append(load_images(synthetic, list(range(len(synthetic))), settings))
    return torch.cat(pools)


def class_of(value: str, settings: SslSettings) -> str | None:
    """A row's class name for the probe, or None when it has no usable label."""
    if value in ("", "nan") or value in settings.ignore_labels:
        return None
    if settings.positive_label is None:
        return str(value)
    return settings.positive_label if fnmatch.fnmatch(str(value), settings.positive_label) else "other"


def open_with_validation(data_dir: Path, settings: SslSettings, log: bool = True
                         ) -> tuple[DatasetFolder, ValidationSplit]:
    """The real folder with a val split for the probe: its own, or the same carve from train for every stage
    (`medaug.data.validation`), so carved rows are neither pre-trained on nor probed as training rows."""
    folder = DatasetFolder(data_dir)
    try:
        return folder, ensure_validation(folder, settings.label_column, log)
    except DatasetError as error:
        raise SslStudyError(f"--data {error}") from error


def labelled_data(data_dir: Path, settings: SslSettings) -> LabelledData:
    """The labelled rows of each split, read after pre-training."""
    folder, validation = open_with_validation(data_dir, settings)
    if not folder.has_column(settings.label_column):
        raise SslStudyError(f"--label_column: {folder.metadata_path} has no column '{settings.label_column}'")
    named = {split: [(i, class_of(folder.value(i, settings.label_column), settings)) for i in range(len(folder))
                     if folder.split(i) == split] for split in ("train", "val", "test")}
    classes = sorted({name for rows in named.values() for _, name in rows if name is not None})
    if len(classes) < 2:
        raise SslStudyError(f"--label_column {settings.label_column}: needs at least two classes, found {classes}")
    kept = {split: [(i, name) for i, name in rows if name is not None] for split, rows in named.items()}
    for split in ("train", "test"):
        if len({name for _, name in kept[split]}) < 2:
            raise SslStudyError(f"--label_column {settings.label_column}: split '{split}' has fewer than two "
                                "classes among its labelled rows")
    if not kept["val"]:
        raise SslStudyError(f"--label_column {settings.label_column}: split 'val' has no row with a usable label; "
                            "the probe's regularisation is chosen on it")
    return LabelledData(
        images={split: load_images(folder, [i for i, _ in rows], settings) for split, rows in kept.items()},
        labels={split: np.array([classes.index(name) for _, name in rows], dtype=np.int64)
                for split, rows in kept.items()},
        classes=classes, names={split: [folder.value(i, "file_name") for i, _ in rows] for split, rows in kept.items()},
        validation=validation)


def class_counts(data: LabelledData) -> dict:
    return {split: {name: int(np.sum(labels == k)) for k, name in enumerate(data.classes)}
            for split, labels in data.labels.items()}


def _pretrained_scores(run: Run, pool: torch.Tensor, data: LabelledData, settings: SslSettings, device: str):
    encoder = (initial_encoder(pool, settings.pretrain, run.seed).to(device) if run.method == "random" else
               pretrain(pool, run.method, run.policy, settings.pretrain, run.seed, device))
    features = {split: encode(encoder, images) for split, images in data.images.items()}
    probe = fit_probe(features["train"], data.labels["train"], features["val"], data.labels["val"],
                      len(data.classes))
    scores = classification_scores(data.labels["test"], probe.probabilities(features["test"]))
    return Classifier(encoder, probe.as_layer()), scores, {"probe_l2": probe.l2}


def _supervised_scores(run: Run, data: LabelledData, settings: SslSettings, device: str):
    model = train_supervised(data.images["train"], data.labels["train"], len(data.classes), run.policy,
                             settings.supervised_steps, settings.pretrain.batch_size, settings.pretrain.learning_rate,
                             run.seed, settings.pretrain.block_channels, device)
    return model, classification_scores(data.labels["test"], predict(model, data.images["test"])), {}


def execute_run(run: Run, data_dir: Path, data: LabelledData, settings: SslSettings, output_dir: Path,
                pools: dict, device: str) -> dict:
    """Train and score one run; write its result (and the model as safetensors) under runs/<name>/."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    if run.method == "supervised":
        model, scores, extra = _supervised_scores(run, data, settings, device)
        pool_size = int(data.images["train"].shape[0])
    else:
        if run.pool not in pools:
            pools[run.pool] = unlabelled_pool(data_dir, settings, run.pool == "real+synthetic")
        model, scores, extra = _pretrained_scores(run, pools[run.pool], data, settings, device)
        pool_size = int(pools[run.pool].shape[0])
    folder = output_dir / "runs" / run.name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(folder / "model.safetensors"))
    result = {"run": run.name, "method": run.method, "policy": run.policy.name,
              "augmentations": list(run.policy.augmentations), "pool": run.pool, "seed": run.seed,
              "pool_size": pool_size, "scores": scores, "seconds": round(time.perf_counter() - started, 1), **extra}
    write_json_atomic(folder / "result.json", result, indent=1)  # last: the run is done
    return result


def check_settings(output_dir: Path, settings: SslSettings, data_dir: Path) -> None:
    """Refuse a study folder made with other settings (methods, policies and seeds may grow)."""
    path = output_dir / SETTINGS_NAME
    current = json.loads(json.dumps(asdict(settings)))
    if not path.is_file():  # a new study: an empty folder that is not one of its inputs
        try:
            refuse_input_folder(output_dir, {"--data": data_dir, "--synthetic": settings.synthetic})
            refuse_foreign_entries(output_dir, "medaug ssl")
        except OutputFolderError as error:
            raise SslStudyError(str(error)) from error
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        added_synthetic = stored.get("synthetic") is None  # a pool arm added to a finished study: more runs
        changed = [key for key in current if key not in GROWABLE and stored.get(key) != current[key]
                   and not (key in ("synthetic", "allow_unknown_provenance") and added_synthetic)]
        if changed:
            raise SslStudyError(f"--output_dir: {output_dir} holds a study made with other settings "
                                f"({', '.join(changed)}); choose another folder or keep them")
    write_json_atomic(path, current, indent=1)


# What a finished run's result.json must hold for the summary.
RESULT_FIELDS = {"run": "str", "method": "str", "policy": "str", "augmentations": "list", "pool": "str", "seed": "int",
                 "scores": "dict", "seconds": "float"}


def read_back(path: Path) -> dict:
    try:
        return read_record(path, RESULT_FIELDS, RERUN_ADVICE)
    except RecordError as error:
        raise SslStudyError(str(error)) from None


def run_ssl_study(data_dir: str | Path, output_dir: str | Path, settings: SslSettings, device: str = "cpu",
                  on_run: Callable[[int, int, str], None] | None = None) -> dict:
    """Run (or resume) the study; return the summary also written to summary.json and report.html."""
    from medaug.segmentation.inputs import synthetic_pool
    from medaug.ssl.report import summarise, write_report

    data_dir, output_dir = Path(data_dir), Path(output_dir)
    for method in settings.methods:
        if method not in METHODS:
            raise SslStudyError(f"--method: unknown method '{method}'; expected {', '.join(METHODS)}")
    runs = plan_runs(settings)
    check_settings(output_dir, settings, data_dir)
    data = labelled_data(data_dir, settings)
    notes = [data.validation.describe()] if data.validation.carved else []
    notes += synthetic_pool(settings.synthetic, data_dir, settings.allow_unknown_provenance)[1] \
        if settings.synthetic else []  # refused now, not after the real runs
    pools: dict[str, torch.Tensor] = {}
    results = []
    for number, run in enumerate(runs):
        if on_run is not None:
            on_run(number, len(runs), run.name)
        path = output_dir / "runs" / run.name / "result.json"
        results.append(read_back(path) if path.is_file()
                       else execute_run(run, data_dir, data, settings, output_dir, pools, device))
    summary = summarise(results, class_counts(data), data.classes, settings, notes, data.validation)
    write_json_atomic(output_dir / "summary.json", summary, indent=1)
    write_report(output_dir, summary, runs, data, settings)
    return summary
