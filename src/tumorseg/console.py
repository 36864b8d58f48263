"""What a training run prints: the libraries' advertising and internal warnings left out."""

from __future__ import annotations

import logging
import warnings

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
