"""Run a training script of `medaug.scripts` in this process, as `python -m medaug.scripts.NAME ...` would.

The demo, the low-data study and the benchmarks chain several training runs; they call the scripts' own
`parse_args` and `main` rather than copying what the scripts do.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from medaug.run_record import RECORD_NAME


def run_script(name: str, arguments: list) -> dict:
    """`main(parse_args(arguments))` of `medaug.scripts.<name>`, with every argument passed as text."""
    script = importlib.import_module(f"medaug.scripts.{name}")
    return script.main(script.parse_args([str(value) for value in arguments]))


def rerun_flags(output_dir: Path) -> list[str]:
    """How a chained run re-enters its own folder: `--resume_from_checkpoint latest` where an interrupted run left
    a checkpoint; `--overwrite` where a run finished without one (the caller chose to train it again); nothing
    for a new folder. A training script refuses a folder holding another run without one of these."""
    output_dir = Path(output_dir)
    if any(output_dir.glob("checkpoint-*")):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite"] if (output_dir / RECORD_NAME).is_file() else []
