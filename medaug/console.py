"""Terminal output shared by every `medaug` subcommand: one console for results, one for errors."""

from __future__ import annotations

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
