"""Packed slice store: every axial slice of a data set in two contiguous memory-mappable arrays.

A store is a directory::

    DST/images.npy     (S, 4, H, W) float16 or float32, z-scored per volume over brain voxels
    DST/labels.npy     (S, H, W) uint8, canonical labels 0 bg / 1 NCR / 2 ED / 3 ET
    DST/slices.npy     (S,) per-slice brain and tumour pixel counts (for filtering and sampling)
    DST/manifest.json  source, format, options, cases in order, skipped cases, content hash
    DST/splits.json    patient splits written by the DataModule (optional)

Slices of one case are consecutive, in z order: case ``c`` owns rows
``first .. first + count - 1``. A store is complete iff ``manifest.json`` exists; ``prepare``
writes it last, then renames ``DST.partial`` to ``DST``. This module needs only numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.core.errors import DataError

FORMAT_VERSION = 1
IMAGES, LABELS, SLICES = "images.npy", "labels.npy", "slices.npy"
MANIFEST, SPLITS_FILE = "manifest.json", "splits.json"
DTYPES = ("float16", "float32")
# per-slice record: pixels with brain (any modality non-zero) and with tumour (label > 0)
SLICE_DTYPE = np.dtype([("brain", "<i4"), ("tumour", "<i4")])
HASH_CHUNK = 64 << 20  # bytes per sha256 update


def partial_path(dst: str | Path) -> Path:
    """The work directory of an unfinished store: ``DST.partial`` next to ``DST``."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".partial")


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a finished store (its manifest exists)."""
    return (Path(path) / MANIFEST).is_file()


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    """Parsed JSON; a missing or broken file becomes a DataError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from None


def save_array(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def update_hash(hasher: Any, array: np.ndarray) -> None:
    """Feed an array's bytes (C order) into ``hasher`` in chunks of about ``HASH_CHUNK`` bytes."""
    rows = max(1, HASH_CHUNK // max(1, array[:1].nbytes)) if array.ndim else 1
    if array.ndim == 0 or len(array) == 0:
        hasher.update(np.ascontiguousarray(array).tobytes())
        return
    for start in range(0, len(array), rows):
        hasher.update(memoryview(np.ascontiguousarray(array[start : start + rows])).cast("B"))


def content_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the bytes of ``images`` then ``labels``, streamed in chunks."""
    hasher = hashlib.sha256()
    update_hash(hasher, images)
    update_hash(hasher, labels)
    return hasher.hexdigest()


def slice_counts(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-slice brain and tumour pixel counts of one case, ``image (Z, 4, H, W)``."""
    out = np.empty(len(labels), dtype=SLICE_DTYPE)
    out["brain"] = (image != 0).any(1).sum((1, 2))
    out["tumour"] = (labels > 0).sum((1, 2))
    return out


@dataclass
class Store:
    """A complete store opened read-only: memory-mapped arrays and the manifest."""

    root: Path
    manifest: dict
    images: np.ndarray  # (S, 4, H, W) memmap
    labels: np.ndarray  # (S, H, W) memmap
    slices: np.ndarray  # (S,) SLICE_DTYPE
    _ranges: dict[str, range] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ranges = {
            c["id"]: range(c["first"], c["first"] + c["count"]) for c in self.manifest["cases"]
        }

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def case_ids(self) -> list[str]:
        """Case ids in store order."""
        return [c["id"] for c in self.manifest["cases"]]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def shape(self) -> tuple[int, int]:
        """In-plane slice size ``(H, W)``."""
        return tuple(self.images.shape[-2:])

    def case_range(self, case_id: str) -> range:
        """Row indices of ``case_id``'s slices, in z order."""
        if case_id not in self._ranges:
            raise DataError(f"{self.root}: no case {case_id!r} in this store")
        return self._ranges[case_id]


def open_store(path: str | Path) -> Store:
    """Open a complete store read-only; DataError when it is incomplete, foreign or damaged."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no slice store here (run tumorseg-prepare)")
    if not is_complete(root):
        raise DataError(f"{root}: incomplete slice store (no {MANIFEST}); rerun tumorseg-prepare")
    manifest = read_json(root / MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{root / MANIFEST}: store format version {version}, this tumorseg reads "
            f"{FORMAT_VERSION}; rebuild with tumorseg-prepare --force"
        )
    try:
        images = np.load(root / IMAGES, mmap_mode="r")
        labels = np.load(root / LABELS, mmap_mode="r")
        slices = np.load(root / SLICES)
    except (OSError, ValueError) as err:
        raise DataError(f"{root}: cannot map the store arrays ({err})") from None
    total = manifest["total_slices"]
    if not (len(images) == len(labels) == len(slices) == total) or images.ndim != 4:
        raise DataError(
            f"{root}: array shapes {images.shape} / {labels.shape} do not match "
            f"the manifest's {total} slices"
        )
    return Store(root, manifest, images, labels, slices)


def verify_store(store: Store) -> bool:
    """Recompute the content hash and compare it with the manifest's (reads every byte)."""
    return content_hash(store.images, store.labels) == store.hash
