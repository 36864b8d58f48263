"""What the loaders read: rows of a slice store as batches (:class:`StoreSlices`), the
foreground-weighted training sampler and the evaluation sampler that gives each slice to one
rank under DDP."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tumorseg.core.errors import DataError
from tumorseg.data.preprocess import resize_batch
from tumorseg.data.store import open_store

log = logging.getLogger(__name__)


def keep_batch(batch: Any) -> Any:
    """collate_fn for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class StoreSlices(Dataset):
    """Rows ``rows`` of a slice store as ``(image (C, H, W) float32, labels (H, W) uint8)``.

    ``__getitems__`` (used by DataLoader's batched fetch) reads a whole batch from the memory
    map in one indexing call and returns it already stacked: use ``collate_fn=keep_batch``.
    The arrays are mapped lazily in each process, so the dataset pickles cheaply to workers.
    """

    def __init__(
        self,
        root: str | Path,
        rows: np.ndarray,
        image_size: int | None = None,
        transform: Any = None,
    ) -> None:
        self.root, self.rows = Path(root), np.asarray(rows, dtype=np.int64)
        self.image_size, self.transform = image_size, transform
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            store = open_store(self.root)
            self._arrays = (store.images, store.labels)
        return self._arrays

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked, resized (not augmented) slices of dataset items ``items``, sorted by row."""
        images, labels = self.arrays()
        rows = np.sort(self.rows[np.asarray(items, dtype=np.int64)])
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # consecutive: one slice read
            part = slice(rows[0], rows[-1] + 1)
            image, label = np.array(images[part]), np.array(labels[part])
        else:  # fancy indexing copies already
            image, label = images[rows], labels[rows]
        # torch converts float16 to float32 much faster than numpy
        image = torch.from_numpy(image).float()
        return resize_batch(image, torch.from_numpy(label), self.image_size)

    def __getitems__(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.read(items)
        if self.transform is not None:
            image, labels = self.transform(image, labels)
        return image, labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.__getitems__([i])
        return image[0], labels[0]


class ForegroundSampler(Sampler[int]):
    """Epochs of ``len(foreground)`` items, a ``ratio`` of them drawn from items with tumour.

    Each pool is drawn without replacement while it lasts (reshuffled when used up); the
    epoch's order is shuffled. Seeds come from torch's global generator.
    """

    def __init__(self, foreground: np.ndarray, ratio: float) -> None:
        self.fg = np.flatnonzero(foreground)
        self.bg = np.flatnonzero(~np.asarray(foreground, dtype=bool))
        self.ratio, self.n = ratio, len(foreground)
        if not len(self.fg) and ratio > 0:
            raise DataError("foreground_ratio > 0 but no training slice holds tumour")
        if not len(self.bg) and ratio < 1:
            log.warning("every training slice holds tumour: foreground_ratio has no effect")
            self.ratio = 1.0

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _draw(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
        reps = -(-k // len(pool)) if k else 0
        return np.concatenate([rng.permutation(pool) for _ in range(reps)] or [pool[:0]])[:k]

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        n_fg = round(self.ratio * self.n)
        picks = np.concatenate(
            [self._draw(rng, self.fg, n_fg), self._draw(rng, self.bg, self.n - n_fg)]
        )
        return iter(rng.permutation(picks).tolist())


def eval_sampler(ds: Dataset) -> Sampler[int] | None:
    """Under DDP, each slice on exactly one rank. Lightning's default ``DistributedSampler``
    pads the last batch by repeating up to ``world_size - 1`` slices, which pooled metrics
    would count twice; this sampler gives ranks unequal shares instead (fine for evaluation,
    where ranks do not wait for each other's gradients)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(ds, shuffle=False)
