"""Shared pieces of the command-line tools: one-line argument errors."""

from __future__ import annotations

import argparse


class ArgError(Exception):
    """A bad command-line argument; the message is one line."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser that raises ``ArgError`` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgError(message)
