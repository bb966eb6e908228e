"""`logs/losses.jsonl`: every training run's loss history, one JSON line per optimiser step.

It is written whatever tracker `--report_to` chooses (TensorBoard, none), so a run can be plotted with nothing
but a JSON reader: `pandas.read_json(run / "logs" / "losses.jsonl", lines=True)`. A resumed run first drops the
lines after the step it resumes from, so the file always describes one run without repeats.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medaug.files import write_text_atomic

LOSS_HISTORY = Path("logs") / "losses.jsonl"


def read_loss_history(path: str | Path) -> list[dict]:
    """The lines of a losses.jsonl file; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class LossHistory:
    """Appends `{"step", "seconds", **values}` lines to `path`; `enabled=False` (non-main processes) writes nothing."""

    def __init__(self, path: str | Path, resumed_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.started = time.perf_counter()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [record for record in read_loss_history(self.path) if record.get("step", 0) <= resumed_step]
        self._rewrite(kept)
        self.offset = kept[-1]["seconds"] if kept else 0.0

    def _rewrite(self, records: list[dict]) -> None:
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in records))

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        seconds = round(self.offset + time.perf_counter() - self.started, 3)
        line = json.dumps({"step": step, "seconds": seconds} | {k: float(v) for k, v in values.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
