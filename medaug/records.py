"""Records medaug reads back (run records, manifest lines, checkpoint states), checked against the dataclass or
field table that writes them before anything trusts them: a missing field, a field of the wrong type or an unknown
key is refused in one line naming the file and the field, instead of a KeyError deep in the caller."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

# Annotation text (the modules use `from __future__ import annotations`) -> the JSON types it accepts.
JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
              "list": (list,)}


RERUN_ADVICE = "; delete that run's folder to train it again"


class RecordError(ValueError):
    """A record medaug wrote earlier does not read back as it was written; the message names file and field."""


def checked_fields(raw: object, kind: type, where: str, allow_unknown: bool = False) -> dict:
    """`raw` as keyword arguments of the dataclass `kind`, after checking it is an object holding every field
    without a default, each of its annotated type; unknown keys are refused unless `allow_unknown` (then dropped)."""
    known = {item.name: item for item in fields(kind)}
    if isinstance(raw, dict) and not allow_unknown and set(raw) - set(known):
        raise RecordError(f"{where}: unknown field(s) {sorted(set(raw) - set(known))}")
    required = [name for name, item in known.items() if item.default is MISSING and item.default_factory is MISSING]
    check_record(raw, required, {name: str(item.type) for name, item in known.items()}, where)
    return {name: value for name, value in raw.items() if name in known}


def check_record(record: object, required: list[str], annotations: dict[str, str], where: str,
                 advice: str = "") -> None:
    """`record` is a JSON object holding every `required` field, and each field of the type its annotation names;
    RecordError naming `where` and the field otherwise, followed by `advice` (what to do about it)."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}{advice}")
    missing = [name for name in required if name not in record]
    if missing:
        raise RecordError(f"{where}: lacks field(s) {missing}{advice}")
    try:
        check_types(record, annotations, where)
    except RecordError as error:
        raise RecordError(f"{error}{advice}") from None


def check_types(values: dict, annotations: dict[str, str], where: str) -> None:
    """Each value of the type its annotation text names ('int', 'str | None', ...); others are not checked."""
    for name, value in values.items():
        options = [part.strip() for part in annotations.get(name, "").split("|")]
        if value is None and "None" in options:
            continue
        if any(option not in JSON_TYPES and option != "None" for option in options):
            continue  # an annotation these checks do not read (list[str], object, ...)
        accepted = tuple(kind for option in options for kind in JSON_TYPES.get(option, ()))
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            raise RecordError(f"{where}: field '{name}' should be {' or '.join(options)}, "
                              f"got {type(value).__name__} {value!r:.60}")


def read_record(path: str | Path, required: dict[str, str], advice: str = "") -> dict:
    """A JSON object medaug wrote earlier (a run's result.json, a study's pairs.json), with every `required` field
    present and of its type ('int', 'dict', 'str | None'...); RecordError naming the file and field otherwise,
    followed by `advice` (what to do about it)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: not readable JSON ({error}){advice}") from None
    check_record(record, list(required), required, str(path), advice)
    return record
