"""Terminal output shared by every `medaug` subcommand: one console for results, one for errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


def describe(error: BaseException) -> str:
    """One line naming what failed: an OSError by its file, anything else by its own message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


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
