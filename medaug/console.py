"""Terminal output shared by every `medaug` subcommand: one console for results, one for errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and leave with `code` (2: bad flags or input).

    The message is escaped: file names and advice such as `pip install 'medaug[parquet]'` hold brackets that
    Rich would otherwise read as markup and drop."""
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: medaug's own errors (ValueErrors that name the flag, file or column), the file
    system's (OSError and its kin: missing, unwritable, not a folder) and unreadable safetensors files."""
    from safetensors import SafetensorError

    return ValueError, OSError, SafetensorError


def describe(error: BaseException, argv: list[str] | None = None) -> str:
    """One line naming what failed: an OSError by its file, medaug's own errors by their message (which names the
    flag, file or column), and an error raised inside numerical code (numpy, torch, ...) by its message, where it
    was raised and the command's inputs, since such a message names none of them."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    message = str(error) or type(error).__name__
    library = foreign_origin(error)
    if library is None:
        return message
    inputs = command_inputs(sys.argv[1:] if argv is None else argv)
    return (f"{message} (raised inside {library} while working on {inputs or 'the command line above'}; "
            "check those inputs, and report it if they are fine)")


def foreign_origin(error: BaseException) -> str | None:
    """The library (top-level package) whose code raised `error`, or None when medaug's own code raised it."""
    import traceback
    from importlib.util import find_spec

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    raised_in = Path(frames[-1].filename).resolve()
    own = [Path(location).resolve() for name in ("medaug", "medaug.segmentation", "medaug.scripts")
           if (spec := find_spec(name)) is not None for location in spec.submodule_search_locations or ()]
    if any(raised_in.is_relative_to(root) for root in own) or raised_in.parent == Path(sys.argv[0]).resolve().parent:
        return None
    parts = raised_in.parts
    return parts[parts.index("site-packages") + 1] if "site-packages" in parts else raised_in.name


def command_inputs(argv: list[str]) -> str:
    """The flags (and bare arguments) of a command line that name existing files or folders."""
    named = []
    for position, value in enumerate(argv):
        if value.startswith("-") or not Path(value).exists():
            continue
        flag = argv[position - 1] if position and argv[position - 1].startswith("--") else ""
        named.append(f"{flag} {value}".strip())
    return ", ".join(named)


@contextmanager
def reporting_errors() -> Iterator[None]:
    """The one place expected failures become `error: <file or flag>: <what>` on stderr and exit status 2, for
    the `medaug` command and every training script; anything else (a bug) keeps its traceback."""
    try:
        yield
    except expected_errors() as error:
        errors.print(f"[bold red]error:[/] {escape(describe(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)


def progress_bar(description: str = "working", disable: bool = False) -> Progress:
    """A Rich progress bar on stderr (so stdout stays parseable): `with progress_bar(...) as bar: ...`."""
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=True,
        disable=disable,
    )


def print_table(title: str, keys: list[str], values: list[str], rows: list[list[str]], target: Console | None = None
                ) -> None:
    """A table whose key columns (the first len(keys) cells of each row: which arm, which fraction) never wrap or
    shrink: value columns that would not fit the terminal (80 columns in a log file) go into further tables that
    repeat the keys, instead of squeezing the keys to nothing."""
    from rich.table import Table

    target = target or console
    widths = [max(len(header), *(len(row[k]) for row in rows)) for k, header in enumerate(keys + values)]
    budget = target.width - sum(width + 3 for width in widths[:len(keys)]) - 1
    groups: list[list[int]] = [[]]
    for k in range(len(keys), len(widths)):
        used = sum(widths[j] + 3 for j in groups[-1])
        if groups[-1] and used + widths[k] + 3 > budget:
            groups.append([])
        groups[-1].append(k)
    for number, group in enumerate(groups):
        table = Table(title=title if number == 0 else f"{title} (continued)")
        for header in keys:
            table.add_column(header, no_wrap=True)
        for k in group:
            table.add_column(values[k - len(keys)], justify="right")
        for row in rows:
            table.add_row(*row[:len(keys)], *(row[k] for k in group))
        target.print(table)
