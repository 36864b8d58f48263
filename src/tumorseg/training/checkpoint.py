"""Reading a tumorseg checkpoint as data, without Lightning: ``tumorseg-predict`` and the
test stage load the net from here, ``tumorseg.training.module`` (the LightningModule)
re-exports it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tumorseg.core.errors import DataError, first_line


def plain_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict without the ``_orig_mod.`` level that ``torch.compile``'s wrapper adds, so
    that checkpoints load into an uncompiled module."""
    return {key.replace("_orig_mod.", ""): value for key, value in state.items()}


class CheckpointError(DataError):
    """A checkpoint that cannot be loaded as plain data."""


# What a tumorseg checkpoint holds besides tensors, containers, numbers and strings.
SAFE_GLOBALS: tuple[Any, ...] = ()


# How torch.save files begin: a zip archive (torch >= 1.6), or the pickled magic number of the
# older format (protocol 2, the long 0x1950a86a20f9469cfc6c).
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


# How torch.load(weights_only=True) names an object it refuses to construct; any other error
# means the file's content is damaged.
OBJECT_REFUSED = (
    r"GLOBAL ([\w.]+)",
    r"Can only (?:create new object|build)[^<]*<class '([\w.]+)'>",
    r"unrecognized function ([\w.<>]+)",
)


def checkpoint_file_problem(path: str | Path) -> str | None:
    """Why the file cannot be a checkpoint written by ``torch.save`` (empty, neither a zip
    archive nor torch's pickle format, a zip archive cut short or without a pickle), or None."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if not head:
        return "empty file, not a PyTorch checkpoint"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "truncated checkpoint (a zip archive that ends early)"
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return f"not a PyTorch checkpoint (broken zip archive: {first_line(err)})"
        if not any(name.endswith("data.pkl") for name in names):
            return "not a PyTorch checkpoint (a zip archive without data.pkl)"
        return None
    if head.startswith(b"\x80"):
        if LEGACY_MAGIC.startswith(head):
            return None
        return "not a PyTorch checkpoint (a pickle that torch.save did not write)"
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False
) -> dict[str, Any]:
    """The checkpoint dict, read as data only (``torch.load(weights_only=True)``).

    A file that is no readable checkpoint (not written by ``torch.save``, truncated, corrupt)
    raises a ``CheckpointError`` saying so. A file holding any other object than plain data
    (which unpickling would construct, running its code) is refused with a ``CheckpointError``
    naming the type, unless ``trust``.
    """
    import pickle

    problem = checkpoint_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    # Errors torch.load raises for a file whose content is damaged.
    damaged = (pickle.UnpicklingError, EOFError, IndexError, KeyError, RuntimeError, ValueError)
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except damaged as err:
        text = str(err)
        found = next(filter(None, (re.search(p, text) for p in OBJECT_REFUSED)), None)
        if found and not trust:
            raise CheckpointError(
                f"{path}: checkpoint holds a {found.group(1)} object, which loading would run as "
                "code; refused (pass --trust-checkpoint only for a file from a source you trust)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        detail = detail.group(1).strip() if detail else first_line(err)
        if isinstance(err, EOFError) or "truncated" in text:
            raise CheckpointError(f"{path}: truncated checkpoint ({detail})") from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, corrupt or truncated ({detail})"
        ) from None
