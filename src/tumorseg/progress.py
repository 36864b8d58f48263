"""The one progress bar every tool shows (rich, on stderr), or none when ``quiet``."""

from __future__ import annotations

from typing import Any


def progress_bar(quiet: bool = False, transient: bool = True) -> Any:
    """A rich ``Progress`` on stderr (use as a context manager); disabled when ``quiet``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
        disable=quiet,
    )
