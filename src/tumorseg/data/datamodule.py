"""LightningDataModule serving axial BraTS slices, split by patient."""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tumorseg.data.nifti import DataError, find_cases, read_case, zscore

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class SliceDataset(Dataset):
    """In-memory slices: ``image (4, H, W)`` float32 and canonical ``labels (H, W)`` uint8."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False) -> None:
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.images[i], self.labels[i]
        if self.flip and torch.rand(()) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return image, labels


def split_cases(case_ids: list[str], val: float, test: float, seed: int) -> dict[str, list[str]]:
    """Seeded split of patients into train/val/test; every case lands in exactly one split."""
    n = len(case_ids)
    n_test = max(1, round(n * test)) if test > 0 else 0
    n_val = max(1, round(n * val))
    if n - n_test - n_val < 1:
        raise DataError(
            f"{n} cases are too few for val={val}, test={test} (need >= {n_val + n_test + 1})"
        )
    order = np.random.default_rng(seed).permutation(sorted(case_ids)).tolist()
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


class BratsDataModule(L.LightningDataModule):
    """Axial slices of BraTS NIfTI case folders, z-scored per volume, resized to ``image_size``.

    Args:
        root: folder of case folders (``BraTS20_Training_001/...``).
        source: ``demo`` (generated into ``root`` when it holds no case) or ``brats``.
        convention: label convention of the seg files (``brats2020`` 0/1/2/4).
        demo_cases, demo_seed: size and seed of the generated demo set.
        image_size: slices are resized to this square size (None keeps the native 240).
        min_brain_fraction: slices with less brain than this fraction of pixels are skipped.
        val_fraction, test_fraction, split_seed: patient-level split.
        flip: random left-right flips of training slices.
    """

    def __init__(
        self,
        root: str,
        source: str = "demo",
        convention: str = "brats2020",
        demo_cases: int = 20,
        demo_seed: int = 0,
        image_size: int | None = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        min_brain_fraction: float = 0.02,
        flip: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.datasets: dict[str, SliceDataset] = {}
        self.index: dict[str, list[tuple[str, int]]] = {}
        self._manifest: dict | None = None

    def prepare_data(self) -> None:
        if self.hparams.source == "demo":
            from tumorseg.data.demo import write_demo

            # writes only the missing cases, so an interrupted generation resumes
            write_demo(self.root, self.hparams.demo_cases, self.hparams.demo_seed)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data directory does not exist")
        if not find_cases(self.root):
            raise DataError(f"{self.root}: no BraTS case folders (ID/ID_flair.nii.gz ...) found")

    def split(self) -> dict[str, list[str]]:
        ids = [p.name for p in find_cases(self.root)]
        h = self.hparams
        return split_cases(ids, h.val_fraction, h.test_fraction, h.split_seed)

    def manifest(self) -> dict:
        """Source, case files with sizes and the split; its hash identifies the data of a run."""
        if self._manifest is None:
            cases = {
                p.name: {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
                for p in find_cases(self.root)
            }
            body = {"source": self.hparams.source, "cases": cases, "split": self.split()}
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            self._manifest = {**body, "hash": digest[:16]}
        return self._manifest

    def _load(
        self, case_ids: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
        def one(cid: str) -> tuple[torch.Tensor, torch.Tensor]:
            case = read_case(self.root / cid, self.hparams.convention)
            image = torch.from_numpy(zscore(case.image)).permute(3, 0, 1, 2)  # (Z, 4, X, Y)
            labels = torch.from_numpy(case.seg).permute(2, 0, 1)  # (Z, X, Y)
            brain = (image != 0).any(1).float().mean((1, 2))
            keep = brain >= self.hparams.min_brain_fraction
            return self._resize(image[keep], labels[keep]), keep.nonzero()[:, 0].tolist()

        with ThreadPoolExecutor(2) as pool:
            loaded = list(pool.map(one, case_ids))
        index = [(cid, z) for cid, (_, zs) in zip(case_ids, loaded, strict=True) for z in zs]
        images = torch.cat([im for (im, _), _ in loaded])
        labels = torch.cat([lb for (_, lb), _ in loaded])
        return images, labels, index

    def _resize(
        self, image: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.hparams.image_size
        if size is None or tuple(image.shape[-2:]) == (size, size):
            return image.contiguous(), labels.contiguous()
        image = F.interpolate(image, size=(size, size), mode="area")
        labels = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest-exact")
        return image.contiguous(), labels[:, 0].to(torch.uint8).contiguous()

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        split = self.split()
        for name in wanted.get(stage, SPLITS):
            if name in self.datasets or not split[name]:
                continue
            images, labels, self.index[name] = self._load(split[name])
            self.datasets[name] = SliceDataset(
                images, labels, flip=name == "train" and self.hparams.flip
            )
            log.info("%s: %d cases, %d slices", name, len(split[name]), len(labels))

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle and len(self.datasets[name]) > self.hparams.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def preview(self, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
        """Fixed validation slices: per validation case, the slice with most tumour (first n)."""
        if "val" not in self.datasets:
            self.setup("validate")
        ds, index = self.datasets["val"], self.index["val"]
        area = (ds.labels > 0).flatten(1).sum(1)
        best: dict[str, int] = {}
        for i, (cid, _) in enumerate(index):
            if cid not in best or area[i] > area[best[cid]]:
                best[cid] = i
        rows = [best[c] for c in sorted(best)][:n]
        return ds.images[rows], ds.labels[rows], [index[i] for i in rows]
