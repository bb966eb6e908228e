"""Run a training script of `medaug.scripts` in this process, as `python -m medaug.scripts.NAME ...` would.

The demo, the low-data study and the benchmarks chain several training runs; they call the scripts' own
`parse_args` and `main` rather than copying what the scripts do.
"""

from __future__ import annotations

import importlib
from pathlib import Path


def run_script(name: str, arguments: list) -> dict:
    """`main(parse_args(arguments))` of `medaug.scripts.<name>`, with every argument passed as text."""
    script = importlib.import_module(f"medaug.scripts.{name}")
    return script.main(script.parse_args([str(value) for value in arguments]))


def resume_flag(output_dir: Path) -> list[str]:
    """--resume_from_checkpoint latest when an interrupted run left a checkpoint."""
    return ["--resume_from_checkpoint", "latest"] if any(Path(output_dir).glob("checkpoint-*")) else []
