"""How tools talk to the user: one-line argument errors (``prog: error: ...``), integer
arguments, the progress bar, and a console free of the libraries' advertising and internal
warnings."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

# Lightning's suggestions to install another company's logging or model service.
ADVERTS = ("💡 Tip:",)
# Deprecations raised inside the libraries themselves, which a user cannot act on.
LIBRARY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class DropAdverts(logging.Filter):
    """Drops log records whose message starts with one of :data:`ADVERTS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ADVERTS)


def quiet() -> None:
    """Leave Lightning's adverts and the libraries' own deprecation warnings off the console.

    Idempotent; call it before the Trainer is built.
    """
    import lightning.pytorch.utilities.rank_zero  # noqa: F401  (swaps in Lightning's logger)
    from lightning_utilities.core import rank_zero

    target = rank_zero.log  # the logger rank_zero_info() writes to
    if not any(isinstance(f, DropAdverts) for f in target.filters):
        target.addFilter(DropAdverts())
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


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


class ArgError(Exception):
    """A bad command-line argument; the message is one line."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser that raises ``ArgError`` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgError(message)


def error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def start(prog: str, parse: Callable[[], argparse.Namespace]) -> argparse.Namespace | int:
    """Arguments from ``parse`` with warnings logged as ``prog: WARNING: ...``; or the exit
    code: 2 after a one-line error for a bad argument, 0 after ``--help``."""
    try:
        args = parse()
    except ArgError as err:
        error(prog, str(err))
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(levelname)s: %(message)s")
    return args


def checked(
    parser: argparse.ArgumentParser, check: Callable, argv: list[str] | None
) -> argparse.Namespace:
    """``parser``'s arguments after ``check(args)`` (which raises ``ArgError``)."""
    args = parser.parse_args(argv)
    check(args)
    return args


def count(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse
