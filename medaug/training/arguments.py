"""What the training scripts' command lines share, each piece used explicitly by each script: help that shows every
default, diffusers flags resolved to what medaug does (or refused with the reason), and `--config FILE`.

A config file is a YAML or JSON mapping of flag names (without dashes) to values; a run's `medaug_args.json` is one
too (its `arguments` replay the run). Its values become flags placed before the command line's, so flags typed on
the command line win, every value passes the flag's own type and choices, and an unknown name is refused by name.
The `medaug` subcommands take the same files through `config_callback` (a click `default_map`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

from medaug.run_record import RECORD_NAME

CONFIG_HELP = ("YAML or JSON file mapping flag names (no dashes) to values, or a run folder's "
               f"{RECORD_NAME} to replay that run; flags on the command line win.")
COMMAND_CONFIG_HELP = "YAML or JSON file mapping flag names (no dashes) to values; flags on the command line win."
# diffusers' example scripts take these; medaug cannot honour them, and says why instead of "unrecognized".
OFFLINE = "medaug never uploads (these machines are offline); upload the output folder yourself"
REFUSED_DIFFUSERS_FLAGS = {
    "push_to_hub": OFFLINE,
    "hub_token": OFFLINE,
    "hub_model_id": OFFLINE,
    "revision": "medaug loads a base as it is; save that revision to a folder and pass the folder",
    "variant": "medaug loads a base's default safetensors weights; save the variant to a folder and pass it",
    "dataset_config_name": "medaug reads local dataset folders (see --dataset_name), not Hub dataset configs",
    "image_column": "a dataset folder names its images in the file_name column of metadata.csv",
    "use_8bit_adam": "bitsandbytes' 8-bit Adam is not wired in; medaug trains with torch AdamW",
    "scale_lr": "scale --learning_rate yourself (diffusers multiplies it by batch size x accumulation x processes)",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default; a required flag says so instead of "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return f"{action.help or ''} (required)"
        return super()._get_help_string(action)


class RefusedFlag(argparse.Action):
    """A diffusers flag medaug does not take: using it stops the parse (exit 2) with the reason. Hidden from the
    usage line; the help's epilog lists them."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, self.reason)


def add_refused_diffusers_flags(parser: argparse.ArgumentParser) -> None:
    for name, reason in REFUSED_DIFFUSERS_FLAGS.items():
        parser.add_argument(f"--{name}", action=RefusedFlag, reason=reason)
    parser.epilog = textwrap.fill("diffusers flags refused here, each with its reason: "
                                  + ", ".join(f"--{name}" for name in REFUSED_DIFFUSERS_FLAGS) + ".", width=100)


# ---------------------------------------------------------------------------------------------------------
# diffusers flags that map onto medaug's
# ---------------------------------------------------------------------------------------------------------

def dataset_folder(train_data_dir: str | None, dataset_name: str | None) -> str:
    """The local dataset folder from --train_data_dir or diffusers' --dataset_name (a local folder only)."""
    if dataset_name is None:
        if train_data_dir is None:
            raise ValueError("give --train_data_dir (a dataset folder with metadata.csv or metadata.jsonl)")
        return train_data_dir
    if not Path(dataset_name).expanduser().is_dir():
        raise ValueError(f"--dataset_name {dataset_name}: medaug reads local dataset folders, not the Hugging Face "
                         "Hub (these machines are offline). Where the Hub is reachable, save it once in imagefolder's "
                         "split layout: OUT/train/, OUT/validation/, each with its image files and a metadata.csv "
                         "naming them in file_name (plus text, mask_file_name, ...); then pass OUT as --train_data_dir")
    if train_data_dir is not None and Path(train_data_dir).resolve() != Path(dataset_name).resolve():
        raise ValueError(f"--dataset_name {dataset_name} and --train_data_dir {train_data_dir} name different "
                         "folders; give one")
    return dataset_name


def epoch_steps(rows: int, batch_size: int, accumulation: int = 1, processes: int = 1) -> int:
    """Optimiser steps in one pass over `rows`, as the scripts' loaders batch them (a last partial batch is
    dropped when there is at least one full one) and as diffusers counts them."""
    batches = rows // batch_size if rows >= batch_size else 1
    return max(1, math.ceil(math.ceil(batches / processes) / accumulation))


def train_steps(max_train_steps: int | None, num_train_epochs: int | None, steps_per_epoch: int,
                default: int) -> int:
    """--max_train_steps if given; else --num_train_epochs passes over the data; else `default`."""
    if max_train_steps is not None:
        return max_train_steps
    if num_train_epochs is not None:
        return num_train_epochs * steps_per_epoch
    return default


def set_tf32(allowed: bool) -> None:
    """--allow_tf32: TensorFloat-32 matrix products and convolutions on Ampere and newer GPUs (faster, slightly
    less exact); nothing changes on a CPU."""
    import torch

    if allowed:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------------
# --config
# ---------------------------------------------------------------------------------------------------------

def read_config(path: str | Path, script: str | None = None) -> dict:
    """The flag mapping of a YAML/JSON file; of a run record, its `arguments` (refused when another script wrote
    it: `script` is the reader's name as records give it, e.g. "finetune")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--config: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else _yaml(text)
    except ValueError as error:
        raise ValueError(f"--config: {path} is not readable {path.suffix.lstrip('.').upper() or 'YAML'} "
                         f"({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    if is_run_record(data):
        if script is not None and data["script"] != script:
            raise ValueError(f"--config: {path} records a {data['script']} run; replay it with "
                             f"python -m medaug.scripts.{data['script']}")
        return {key: value for key, value in data["arguments"].items() if key != "config"}
    return data


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(str(error).replace("\n", " ")) from None


def is_run_record(data: dict) -> bool:
    """A medaug_args.json: flags under `arguments`, the rest describes the run."""
    return isinstance(data.get("arguments"), dict) and "script" in data and "version" in data


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=CONFIG_HELP)


def parse_with_config(parser: argparse.ArgumentParser, input_args: list[str] | None, script: str
                      ) -> argparse.Namespace:
    """`parser.parse_args`, the --config file's flags first so the command line's win."""
    given = list(sys.argv[1:] if input_args is None else input_args)
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config", default=None)
    config = finder.parse_known_args(given)[0].config
    if config is None:
        return parser.parse_args(given)
    return parser.parse_args(config_flags(parser, read_config(config, script), config) + given)


def config_flags(parser: argparse.ArgumentParser, mapping: dict, source) -> list[str]:
    """Command-line tokens for a config mapping; unknown names refused, all of them at once."""
    actions = {option[2:]: action for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option not in ("--help", "--config")}
    unknown = sorted(set(mapping) - set(actions))
    if unknown:
        raise ValueError(f"--config {source}: unknown flag(s) {', '.join(unknown)}; "
                         f"{parser.prog} takes: {', '.join(sorted(actions))}")
    return [token for name, value in mapping.items() for token in _tokens(name, value, actions[name])]


def _tokens(name: str, value, action: argparse.Action) -> list[str]:
    if value is None or (isinstance(action, RefusedFlag) and value is False):  # diffusers configs: push_to_hub: false
        return []
    if action.nargs == 0:  # a switch: true turns it on, false leaves it off
        return [f"--{name}"] if value else []
    if isinstance(value, (list, tuple)):
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [f"--{name}", *map(str, value)]
        value = ",".join(map(str, value))  # "32,768" flags (--embedding_shape, --generator_channels)
    return [f"--{name}={value}"]


def config_callback(ctx, param, value):
    """Click callback of an eager `--config` option: the file's values become the command's defaults (click's
    `default_map`), so flags given on the command line win and values pass each option's own type."""
    from medaug.console import fail

    if value is None:
        return value
    try:
        mapping = read_config(value)
    except ValueError as error:
        fail(str(error))
    names = {option.lstrip("-"): other for other in ctx.command.params if other is not param
             for option in other.opts}
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        fail(f"--config {value}: unknown flag(s) {', '.join(unknown)}; this command takes: "
             f"{', '.join(sorted(names))}")
    defaults = {names[key].name: _click_value(names[key], item) for key, item in mapping.items()}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _click_value(parameter, value):
    if isinstance(value, (list, tuple)) and not getattr(parameter, "multiple", False):
        return ",".join(map(str, value))  # "0.1,0.25,1" options
    return value
