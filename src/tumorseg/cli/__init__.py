"""The command-line tools, and what they share: argument parsing that fails with one line,
the ``prog: error: ...`` line itself, integer arguments and the progress bar.

Each tool is a thin module here (``predict``, ``evaluate``, ``report``, ``prepare``,
``channels``, ``demo``, ``bench``) over library code; no library module imports one.
Writing outputs all or nothing is ``tumorseg.outputs``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from tumorseg.progress import progress_bar

__all__ = ["ArgError", "Parser", "checked", "count", "error", "progress_bar", "start"]


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
