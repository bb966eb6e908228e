"""Resumable training checkpoints (`checkpoint-N/`) written without pickle.

Trainable parameters and optimizer tensors go to safetensors, the rest of the optimizer and LR-scheduler
state to JSON. Randomness needs no saved state: training draws it per step from (seed, step)
(`medaug.training.data_order.step_generator`). `configuration` holds what must match for a resume to be
meaningful (base model, conditioning, LoRA rank, resolution...); a mismatch is refused by name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medaug.files import safetensors_problem
from medaug.records import RecordError, read_record

STATE_FILE = "training_state.json"
STATE_FIELDS = {"step": "int", "configuration": "dict", "optimizer": "dict", "lr_scheduler": "dict"}
DAMAGED_ADVICE = "the checkpoint is damaged (resume from an earlier one, or pass --overwrite to start again)"


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed; the message names the checkpoint and the reason."""


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: str | Path, step: int, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler,
    configuration: dict,
) -> Path:
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, module in modules.items():
        save_file(trainable_state(module), str(partial / f"{name}.safetensors"))
    tensors, structure = _split_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(partial / "optimizer.safetensors"))
    state = {"step": step, "configuration": configuration, "optimizer": structure,
             "lr_scheduler": lr_scheduler.state_dict()}
    (partial / STATE_FILE).write_text(json.dumps(state, indent=1, default=_jsonable))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)  # a killed save leaves only a .partial folder, never a half checkpoint
    return directory


def load_checkpoint(
    directory: str | Path, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler, configuration: dict
) -> int:
    """Restore modules, optimizer and scheduler in place and return the step the checkpoint was taken at."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory}: not a medaug checkpoint (no {STATE_FILE})")
    state = _read_state(state_path)
    differences = [f"{key}: checkpoint has {state['configuration'].get(key)!r}, this run has {value!r}"
                   for key, value in configuration.items() if state["configuration"].get(key) != value]
    if differences:
        raise CheckpointError(f"{directory}: checkpoint from another configuration; " + "; ".join(differences))
    for name, module in modules.items():
        _load_trainable(directory / f"{name}.safetensors", module)
    tensors = _read_tensors(directory / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        return int(state["step"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{state_path}: optimizer or scheduler state does not fit this run "
                              f"({type(error).__name__}: {error}); the checkpoint was edited or is damaged") from None


def check_checkpoint(directory: Path) -> None:
    """Refuse a damaged checkpoint before a resumed run loads anything: its state must read as JSON and each
    safetensors file's header and length must check out (the tensors themselves are read at resume)."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory}: not a medaug checkpoint (no {STATE_FILE})")
    _read_state(state_path)
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise CheckpointError(f"{path}: {problem}; {DAMAGED_ADVICE}")


def _read_state(path: Path) -> dict:
    try:
        state = read_record(path, STATE_FIELDS, "; the checkpoint is damaged or was edited")
    except RecordError as error:
        raise CheckpointError(str(error)) from None
    named = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
    if state["step"] < 0 or named and int(named.group(1)) != state["step"]:
        raise CheckpointError(f"{path}: field 'step' says {state['step']}, but the checkpoint folder is "
                              f"{path.parent.name}; the checkpoint was edited or is damaged")
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}); {DAMAGED_ADVICE}") from None


def _load_trainable(path: Path, module: torch.nn.Module) -> None:
    saved = _read_tensors(path)
    expected = set(trainable_state(module))
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
        raise CheckpointError(f"{path}: parameters do not match this model (missing {missing}, unexpected {extra})")
    module.load_state_dict(saved, strict=False)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, structure = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, values in state_dict["state"].items():
        entry = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"{param_id}.{key}"}
            else:
                entry[key] = value
        structure["state"][str(param_id)] = entry
    return tensors, structure


def _join_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {}
    for param_id, values in structure["state"].items():
        state[int(param_id)] = {key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value
                                else value for key, value in values.items()}
    return {"state": state, "param_groups": structure["param_groups"]}


def _jsonable(value):
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    return None  # callables in scheduler state (lr_lambdas) are rebuilt by the script, not saved


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders in step order."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_checkpoint(output_dir: str | Path, value: str) -> Path | None:
    """`latest` (None if there is none yet) or a path; a path that is not a checkpoint is an error."""
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / value
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint: {value} is not a checkpoint folder")
    return path


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Keep the newest `keep` checkpoints (all when keep is None)."""
    if keep is None:
        return
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else list_checkpoints(output_dir):
        shutil.rmtree(old)
