"""LightningDataModule serving axial BraTS slices from a packed slice store, split by patient.

``root`` is a raw data set (Kaggle h5, BraTS NIfTI folders, MSD Task01; the demo set is
generated there first) or a store made by ``tumorseg-prepare``. A raw source is prepared once
into a cached store (``prepare_data``, rank 0 only), then every split is served from the
memory-mapped arrays: batches are read in one go, converted to float32, resized to
``image_size`` and, for training, augmented (``tumorseg.data.transforms``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

from tumorseg.core.errors import DataError
from tumorseg.core.labels import MASK_ORDER
from tumorseg.core.timing import phase
from tumorseg.data.case import MODALITIES, Case
from tumorseg.data.datasets import ForegroundSampler, StoreSlices, eval_sampler, keep_batch
from tumorseg.data.preprocess import SKIP_EMPTY, Preprocessing, keep_slices
from tumorseg.data.splits import SPLITS, kfold_cases, split_cases
from tumorseg.data.store import (
    MANIFEST,
    SPLITS_FILE,
    Store,
    is_complete,
    open_store,
    read_json,
    write_json,
)
from tumorseg.data.transforms import Augment

log = logging.getLogger(__name__)
__all__ = ["BratsDataModule"]


def _plain(value: Any) -> Any:
    """OmegaConf containers (as Hydra passes them) as plain dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _skip_mode(value: Any) -> str:
    if value is True:
        return "brain"
    if value in (False, None):
        return "none"
    if value not in SKIP_EMPTY:
        raise DataError(f"skip_empty must be one of {', '.join(SKIP_EMPTY)}, got {value!r}")
    return value


def _augment(augment: Any, flip: bool) -> Augment | None:
    """The training transform: ``augment`` (a dict of ``Augment`` fields, or False for none),
    else left-right flips only (``flip``; ``Augment``'s default)."""
    if augment is False or (augment is None and not flip):
        return None
    if augment is None or augment is True:
        return Augment()
    fields = dict(augment)
    if not flip:
        fields.update(flip_x=0.0, flip_y=0.0)
    return Augment(**fields)


# ---------------------------------------------------------------- the DataModule


class BratsDataModule(L.LightningDataModule):
    """Axial slices of a BraTS data set, z-scored per volume, resized to ``image_size``.

    Args:
        root: raw data set folder (``format``) or a prepared slice store.
        source: ``demo`` (generated into ``root`` when missing) or the data set's name
            (``brats``, ``brats_h5``, ``msd``; an MLflow tag).
        format: ``auto``, ``kaggle-h5``, ``brats`` or ``msd`` (for a raw ``root``).
        cache_dir: store of a raw ``root``; None: ``cache_root/<root name>-<hash of the
            resolved root and the prepare options>``.
        cache_root: folder of cached stores (None: ``cache`` beside ``root``).
        dtype: prepare option (see ``tumorseg-prepare``): stored image dtype.
        crop: prepare option: in-plane crop window around the brain and tumour.
        channel_order: prepare option: modality order of the Kaggle h5 images.
        mask_order: prepare option: region order of the Kaggle h5 masks.
        convention: prepare option: label convention of the source.
        prepare_workers: processes converting cases and writing the demo cases.
        skip_bad: prepare option: leave out bad cases instead of failing.
        demo_cases: size of the generated demo set.
        demo_seed: seed of the generated demo set.
        demo_difficulty: ``brats`` or ``easy`` (see ``tumorseg-demo``).
        image_size: slices are resized to this square size per batch (None: store size).
        val_fraction: patient-level share of the validation split.
        test_fraction: patient-level share of the test split, drawn first.
        split_seed: seed of the patient-level split.
        fold: the validation fold of k-fold cross-validation of the non-test cases (None:
            plain split).
        folds: the number of folds.
        skip_empty: ``none``, ``brain`` (drop slices with less than ``min_brain_fraction``
            brain, every split) or ``tumour`` (also drop training slices without tumour).
        foreground_ratio: fraction of training samples drawn from slices with tumour (None:
            uniform shuffling).
        augment: ``Augment`` fields for training batches; None: flips only; False: none.
        augment_on_device: augment after the batch is on the training device (GPU: nearly
            free, and the loader only reads) instead of in the loader.
        flip: False turns the flips off.
    """

    def __init__(
        self,
        root: str,
        source: str = "demo",
        format: str = "auto",
        cache_dir: str | None = None,
        cache_root: str | None = None,
        dtype: str = "float16",
        crop: int | None = None,
        channel_order: Sequence[str] = MODALITIES,
        mask_order: Sequence[str] = MASK_ORDER,
        convention: str | None = None,
        prepare_workers: int = 1,
        skip_bad: bool = False,
        demo_cases: int = 20,
        demo_seed: int = 0,
        demo_difficulty: str = "brats",
        image_size: int | None = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        fold: int | None = None,
        folds: int = 5,
        min_brain_fraction: float = 0.02,
        skip_empty: str | bool = "brain",
        foreground_ratio: float | None = None,
        augment: dict | bool | None = None,
        augment_on_device: bool = False,
        flip: bool = True,
    ) -> None:
        super().__init__()
        # plain types only: the hyper-parameters go into checkpoints, which are read as data
        channel_order, mask_order = tuple(channel_order), tuple(mask_order)
        augment = _plain(augment)
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.skip_empty = _skip_mode(skip_empty)
        if foreground_ratio is not None and not 0 <= foreground_ratio <= 1:
            raise DataError(f"foreground_ratio must be in [0, 1], got {foreground_ratio}")
        self.augment = _augment(augment, flip)
        self.datasets: dict[str, StoreSlices] = {}
        self.index: dict[str, list[tuple[str, int]]] = {}
        self._store: Store | None = None
        self._split: dict[str, list[str]] | None = None
        self._manifest: dict | None = None
        self._prepared = False  # prepare_data ran in this process

    # ------------------------------------------------------------ the store

    def _prepare_options(self) -> dict:
        from tumorseg.data.preprocess import ORIENTATION, SPACING

        h = self.hparams
        fmt = h.format
        if fmt == "auto" and self.root.is_dir():  # the same cache for auto and its answer
            from tumorseg.data.readers import detect_format

            fmt = detect_format(self.root)
        return {
            "format": fmt,
            "dtype": h.dtype,
            "crop": h.crop,
            "orientation": ORIENTATION,
            "spacing": list(SPACING),
            "channel_order": list(h.channel_order),
            **({"mask_order": list(h.mask_order)} if fmt == "kaggle-h5" else {}),
            "convention": h.convention,
        }

    def store_path(self) -> Path:
        """The store served: ``root`` itself when it is one, else the cached store."""
        if is_complete(self.root):
            return self.root
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir)
        key = {"source": str(self.root.resolve()), **self._prepare_options()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        parent = Path(self.hparams.cache_root) if self.hparams.cache_root else None
        return (parent or self.root.parent / "cache") / f"{self.root.name}-{digest}"

    def _source_cases(self) -> list:
        """The labelled cases of the raw ``root``, listed as ``prepare`` lists them."""
        from tumorseg.data import readers

        h = self.hparams
        return readers.list_cases(
            self.root,
            h.format,
            True,
            tuple(h.channel_order),
            skip_bad=h.skip_bad,
            convention=h.convention,
            mask_order=tuple(h.mask_order),
        )

    def _stale(self, path: Path) -> bool:
        """True when the raw source's cases differ from those the store was made from."""
        refs = self._source_cases()
        manifest = read_json(path / MANIFEST)
        ids = {r.case_id for r in refs}
        skipped = {s["id"] for s in manifest["skipped"]} & ids
        stored = {c["id"] for c in manifest["cases"]} | skipped
        if ids != stored:
            log.warning("%s changed since %s was prepared: preparing again", self.root, path)
        return ids != stored

    def prepare_data(self) -> None:
        """Generate the demo set if asked, then prepare a raw ``root`` into its cached store.

        Once per process: train.py prepares before the logger needs the manifest, and
        ``Trainer.fit`` asks again.
        """
        if self._prepared:
            return
        self._prepared = True
        h = self.hparams
        if h.source == "demo":
            from tumorseg.data.demo import write_demo

            # writes only the missing cases, so an interrupted generation resumes
            with phase("demo"):
                write_demo(
                    self.root,
                    h.demo_cases,
                    h.demo_seed,
                    difficulty=h.demo_difficulty,
                    workers=h.prepare_workers,
                )
        if is_complete(self.root):
            return
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data directory does not exist")
        path = self.store_path()
        force = is_complete(path) and self._stale(path)
        if is_complete(path) and not force:
            return
        with phase("prepare"):
            self._prepare(path, force)
        self._store = self._manifest = self._split = None

    def _prepare(self, path: Path, force: bool) -> None:
        """Pack the raw ``root`` into the store at ``path``."""
        from tumorseg.data.prepare import prepare

        h = self.hparams
        prepare(
            self.root,
            path,
            h.format,
            h.dtype,
            h.crop,
            h.prepare_workers,
            h.skip_bad,
            progress=True,
            channel_order=h.channel_order,
            convention=h.convention,
            mask_order=h.mask_order,
            force=force,
        )

    @property
    def store(self) -> Store:
        """The opened store (DataError when it has not been prepared)."""
        if self._store is None:
            self._store = open_store(self.store_path())
        return self._store

    # ------------------------------------------------------------ splits

    def _split_key(self) -> str:
        h = self.hparams
        if h.fold is None:
            return f"seed={h.split_seed},test={h.test_fraction},val={h.val_fraction}"
        return f"seed={h.split_seed},test={h.test_fraction},folds={h.folds}"

    def split(self) -> dict[str, list[str]]:
        """Patient split of the store's cases, saved in ``splits.json`` in the store."""
        if self._split is not None:
            return self._split
        h, store = self.hparams, self.store
        path, key = store.root / SPLITS_FILE, self._split_key()
        saved = read_json(path) if path.is_file() else {}
        if key not in saved:
            ids = store.case_ids
            if h.fold is None:
                saved[key] = split_cases(ids, h.val_fraction, h.test_fraction, h.split_seed)
            else:
                saved[key] = kfold_cases(ids, h.test_fraction, h.split_seed, h.folds)
            try:
                write_json(path, saved)
            except OSError as err:  # a read-only store still serves
                log.warning("cannot save the split in %s: %s", path, err)
        entry = saved[key]
        if h.fold is None:
            self._split = {k: entry[k] for k in SPLITS}
        else:
            if not 0 <= h.fold < len(entry["folds"]):
                raise DataError(f"fold must be in 0..{len(entry['folds']) - 1}, got {h.fold}")
            val = entry["folds"][h.fold]
            train = sorted(c for k, f in enumerate(entry["folds"]) if k != h.fold for c in f)
            self._split = {"train": train, "val": sorted(val), "test": entry["test"]}
        return self._split

    def manifest(self) -> dict:
        """Store, cases, skipped cases and the split; its hash identifies the data of a run."""
        if self._manifest is None:
            if not is_complete(self.store_path()):
                self.prepare_data()
            m, split = self.store.manifest, self.split()
            body = {
                "source": self.hparams.source,
                "format": m["format"],
                "store_hash": m["hash"],
                "dtype": m["dtype"],
                "crop": m["crop"],
                "cases": {c["id"]: c["count"] for c in m["cases"]},
                "skipped": m["skipped"],
                "split": split,
                "fold": self.hparams.fold,
            }
            identity = {"store_hash": m["hash"], "split": split}
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
            self._manifest = {
                "root": str(self.root),
                "store": str(self.store.root),
                **body,
                "hash": digest[:16],
            }
        return self._manifest

    # ------------------------------------------------------------ datasets

    def preprocessing(self) -> Preprocessing:
        """What turns a raw case into a served slice: the store's orientation, spacing and crop,
        this module's resize and slice filter. Checkpoints record it; inference replays it."""
        m, h = self.store.manifest, self.hparams
        return Preprocessing(
            orientation=m.get("orientation", "LPS"),
            spacing=tuple(m.get("spacing", (1.0, 1.0))),
            crop=m.get("crop"),
            slice_shape=self.store.shape,
            image_size=h.image_size,
            skip_empty=self.skip_empty,
            min_brain_fraction=h.min_brain_fraction,
        )

    def _rows(self, name: str, case_ids: list[str]) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Store rows of the kept slices of ``case_ids`` and their ``(case, z)``."""
        store, pre = self.store, self.preprocessing()
        rows, index = [], []
        for cid in case_ids:
            r = np.arange(store.case_range(cid).start, store.case_range(cid).stop)
            meta = store.slices[r]
            keep = keep_slices(meta["brain"], pre)
            if self.skip_empty == "tumour" and name == "train":
                keep &= meta["tumour"] > 0
            rows.append(r[keep])
            index.extend((cid, int(z)) for z in np.flatnonzero(keep))
        return np.concatenate(rows) if rows else np.zeros(0, np.int64), index

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        split = self.split()
        for name in wanted.get(stage, SPLITS):
            if name in self.datasets or not split[name]:
                continue
            rows, self.index[name] = self._rows(name, split[name])
            in_loader = name == "train" and not self.hparams.augment_on_device
            transform = self.augment if in_loader else None
            self.datasets[name] = StoreSlices(
                self.store.root, rows, self.hparams.image_size, transform
            )
            log.info("%s: %d cases, %d slices", name, len(split[name]), len(rows))

    def _sampler(self) -> Sampler[int]:
        ds, ratio = self.datasets["train"], self.hparams.foreground_ratio
        if ratio is None:
            return RandomSampler(ds)
        return ForegroundSampler(self.store.slices["tumour"][ds.rows] > 0, ratio)

    def _loader(self, name: str, train: bool) -> DataLoader:
        ds, h = self.datasets[name], self.hparams
        return DataLoader(
            ds,
            batch_size=h.batch_size,
            sampler=self._sampler() if train else eval_sampler(ds),
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
            collate_fn=keep_batch,
            pin_memory=torch.cuda.is_available(),
            drop_last=train and len(ds) > h.batch_size,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches get the augmentation here with ``augment_on_device``."""
        trainer = getattr(self, "trainer", None)
        if self.hparams.augment_on_device and self.augment and trainer and trainer.training:
            return self.augment(*batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # ------------------------------------------------------------ whole cases and previews

    def preview(self, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
        """Fixed validation slices: per validation case, the slice with most tumour (first n)."""
        if "val" not in self.datasets:
            self.setup("validate")
        ds, index = self.datasets["val"], self.index["val"]
        tumour = self.store.slices["tumour"][ds.rows]
        best: dict[str, int] = {}
        for i, (cid, _) in enumerate(index):
            if cid not in best or tumour[i] > tumour[best[cid]]:
                best[cid] = i
        items = sorted([best[c] for c in sorted(best)][:n], key=lambda i: ds.rows[i])
        image, labels = ds.read(items)  # read() returns rows in store order
        return image, labels, [index[i] for i in items]

    def raw_cases(self, split: str) -> Iterator[Case] | None:
        """Whole cases of a split as the reader gives them (raw intensities, native grid), for
        the test stage to predict exactly as ``tumorseg-predict`` would; None when ``root`` is
        a store (its source may be gone)."""
        if is_complete(self.root):
            return None
        refs = self._source_cases()
        by_id = {r.case_id: r for r in refs}
        wanted = [by_id[c] for c in self.split()[split] if c in by_id]
        return (ref.load() for ref in wanted)

    def iter_cases(self, split: str) -> Iterator[Case]:
        """Whole cases of a split, one at a time, at store size: normalised images
        ``(4, H, W, Z)``, canonical labels and the source affine (1 mm identity if unknown;
        with a crop its translation is the uncropped one, spacing and orientation hold)."""
        store = self.store
        info = {c["id"]: c for c in store.manifest["cases"]}
        for cid in self.split()[split]:
            r = store.case_range(cid)
            image = np.asarray(store.images[r.start : r.stop], dtype=np.float32)
            labels = np.asarray(store.labels[r.start : r.stop])
            affine = np.asarray(info[cid].get("affine") or np.eye(4), dtype=np.float64)
            yield Case(
                cid,
                np.ascontiguousarray(image.transpose(1, 2, 3, 0)),
                np.ascontiguousarray(labels.transpose(1, 2, 0)),
                affine,
            )

    def iter_test_cases(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Test cases one at a time (see ``test_cases``)."""
        for case in self.iter_cases("test"):
            yield case.case_id, case.image.transpose(3, 0, 1, 2), case.seg.transpose(2, 0, 1)

    def test_cases(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Whole test cases at store size: ``(case_id, image (Z, 4, H, W) float32 normalised,
        labels (Z, H, W) uint8)``, every slice. Holds them all: ``iter_test_cases`` streams."""
        return list(self.iter_test_cases())
