"""``tumorseg-bench-data``: slices/s from the packed store vs. reading the Kaggle ``.h5`` files.

Both sides serve the same training slices in the same run, shuffled, in batches:

* ``store``: the DataModule's train loader over the memory-mapped store (one indexing call per
  batch, float16 -> float32, resize if ``--image-size``, augmentation if ``--augment``);
* ``h5``: a plain Dataset that opens one Kaggle ``volume_V_slice_S.h5`` per slice and returns
  ``image (4, H, W) float32`` and canonical labels, batched by the default collate.

Each runs with a warm page cache (after a full untimed pass) and a cold one. Cold means
``echo 1 > /proc/sys/vm/drop_caches`` (needs root) or, where that fails or with
``--cold fadvise``, ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file read (after
``fsync``); the report says
which one was used and how much of the files ``mincore`` still found in memory. Timing starts
at the first batch (worker start-up excluded). Without ``--input`` a synthetic Kaggle set is
written first and prepared into a store; the
prepare time is reported too::

    tumorseg-bench-data --volumes 8 --workers 0,2 --output bench_data.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.files import write_atomically
from tumorseg.data.store import IMAGES, LABELS, is_complete

PROG = "tumorseg-bench data"
# --augment: the recipe of conf/data/brats.yaml
AUGMENT = {"flip_x": 0.5, "flip_y": 0.5, "p_spatial": 0.3, "p_intensity": 0.3, "p_gamma": 0.3}
log = logging.getLogger(__name__)


@dataclass
class Row:
    """One timed pass."""

    source: str
    cache: str
    workers: int
    slices: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------- the synthetic Kaggle set


def _own_kaggle_writer(root: Path, volumes: Iterable[int], slices: int, size: int) -> None:
    """Kaggle layout (``image`` (H, W, 4) float64, one-hot ``mask`` (H, W, 3) uint8): an
    ellipsoid brain with a spherical tumour (edema, enhancing rim, necrosis) per volume."""
    data = root / "BraTS2020_training_data" / "content" / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y = np.indices((size, size), dtype=np.float32) / (size - 1) * 2 - 1
    for volume in volumes:
        centre = rng.uniform(-0.3, 0.3, 3)
        for s in range(slices):
            z = s / max(slices - 1, 1) * 2 - 1
            brain = x**2 / 0.8 + y**2 / 0.7 + z**2 / 0.9 <= 1
            d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
            classes = np.select([d < 0.08, d < 0.15, d < 0.3], [1, 3, 2], 0) * brain
            image = np.stack(
                [np.where(brain, 100 * (c + 1) + 20 * classes, 0) for c in range(4)], -1
            )
            image = image + brain[..., None] * rng.normal(0, 5, (size, size, 4))
            mask = np.stack([classes == c for c in (1, 2, 3)], -1).astype(np.uint8)
            with h5py.File(data / f"volume_{volume}_slice_{s}.h5", "w") as f:
                f.create_dataset("image", data=image.astype(np.float64))
                f.create_dataset("mask", data=mask)


def write_kaggle(root: Path, volumes: int, slices: int, size: int) -> str:
    """Write a synthetic Kaggle set; returns which writer was used."""
    _own_kaggle_writer(root, range(1, volumes + 1), slices, size)
    return "tumorseg.bench.data"


# ---------------------------------------------------------------- the per-file baseline


class H5Slices(Dataset):
    """One Kaggle slice file per item: ``image (4, H, W) float32``, canonical ``labels (H, W)``."""

    def __init__(self, paths: list[Path], channel_order: tuple[str, ...]) -> None:
        from tumorseg.data.case import MODALITIES

        self.paths = paths
        self.order = [channel_order.index(m) for m in MODALITIES]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with h5py.File(self.paths[i], "r") as f:
            image, mask = f["image"][()], f["mask"][()]
        image = np.ascontiguousarray(image.transpose(2, 0, 1)[self.order], dtype=np.float32)
        # one-hot NCR, ED, ET -> canonical 1, 2, 3 (0 where none is set)
        labels = (mask * np.array([1, 2, 3], dtype=np.uint8)).max(-1)
        return torch.from_numpy(image), torch.from_numpy(labels)


# ---------------------------------------------------------------- page cache


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    c = ctypes
    libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident(paths: list[Path]) -> float | None:
    """Fraction of the pages of ``paths`` in the page cache (``mincore``), None if unknown."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    page, total, cached = mmap.PAGESIZE, 0, 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        n = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * n)()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        if not ok:
            return None
        total += n
        cached += sum(v & 1 for v in vec)
    return cached / total if total else 0.0


def drop_cache(paths: list[Path], how: str = "auto") -> str:
    """Evict ``paths`` from the page cache (``auto``: the global drop, else fadvise); returns
    the method used."""
    os.sync()
    if how == "auto":
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            return "drop_caches"
        except OSError:
            pass
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


# ---------------------------------------------------------------- timing


def timed_pass(loader: DataLoader, limit: int, cycle: bool) -> tuple[int, float]:
    """Slices and seconds from the first batch on, up to ``limit`` slices: one epoch at most,
    or (``cycle``) as many epochs as that takes."""
    it = iter(loader)
    next(it)  # start-up (workers, first reads) is not timed
    start, count = time.perf_counter(), 0
    while count < limit:
        for image, _ in it:
            count += len(image)
            if count >= limit:
                break
        if not cycle:
            break
        it = iter(loader)
    seconds = time.perf_counter() - start
    del it
    return count, seconds


def store_loader(store: Path, args: argparse.Namespace, workers: int) -> tuple[Any, DataLoader]:
    """The DataModule's train loader over ``store`` (every slice kept, as the h5 side)."""
    from tumorseg.data.datamodule import BratsDataModule

    dm = BratsDataModule(
        str(store),
        source="bench",
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=workers,
        val_fraction=args.val_fraction,
        test_fraction=args.val_fraction,
        skip_empty="none",
        augment=AUGMENT if args.augment else False,
    )
    dm.setup("fit")
    return dm, dm.train_dataloader()


def measure(
    name: str,
    make: Callable[[int], tuple[Any, DataLoader]],
    files: list[Path],
    workers: int,
    limit: int,
    cold: str,
    cold_how: list[str],
) -> list[Row]:
    """A cold pass (one epoch after dropping the cache) and a warm one (after a full untimed
    epoch, ``limit`` slices) of ``make(workers)``'s loader."""
    rows = []
    gc.collect()
    how = drop_cache(files, cold)
    cold_how.append(f"{how}, {100 * (resident(files) or 0):.0f}% of the files resident after")
    holder, loader = make(workers)
    n, seconds = timed_pass(loader, limit, cycle=False)
    rows.append(Row(name, "cold", workers, n, seconds))
    timed_pass(loader, len(loader.dataset), cycle=False)  # every file in the cache
    n, seconds = timed_pass(loader, limit, cycle=True)
    rows.append(Row(name, "warm", workers, n, seconds))
    del holder, loader
    gc.collect()
    return rows


# ---------------------------------------------------------------- command line


def workers_list(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,2, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def size_arg(text: str) -> int | None:
    if text.lower() in ("none", "null", "native"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size or none, got {text!r}") from None


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Slices/s: packed store vs. per-file Kaggle h5.")
    add = parser.add_argument
    add("--input", type=Path, default=None, help="Kaggle h5 data set (default: synthetic)")
    add("--work", type=Path, default=None, help="folder for the synthetic set and the store")
    add("--volumes", type=int, default=8, help="synthetic volumes (default 8)")
    add("--slices", type=int, default=155, help="slices per synthetic volume (default 155)")
    add("--size", type=int, default=240, help="synthetic slice size (default 240)")
    add("--workers", type=workers_list, default=[0, 2], help="DataLoader workers (default 0,2)")
    add("--prepare-workers", type=int, default=2, help="tumorseg-prepare workers (default 2)")
    add("--batch-size", type=int, default=16)
    add("--image-size", type=size_arg, default=None, help="store side resize (default none)")
    add("--augment", action="store_true", help="augment the store batches (as training)")
    add("--val-fraction", type=float, default=0.15, help="val and test fraction (default 0.15)")
    add("--max-slices", type=int, default=4000, help="slices per warm pass (default 4000)")
    add("--cold", choices=("auto", "fadvise"), default="auto", help="how to empty the cache")
    add("--keep", action="store_true", help="keep the temporary synthetic set and store")
    add("--output", type=Path, default=None, help="also write the Markdown report here")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.volumes < 3 or args.slices < 1 or args.size < 8:
        raise ArgError("--volumes must be >= 3, --slices >= 1 and --size >= 8")
    if args.batch_size < 1 or args.max_slices < 1 or args.prepare_workers < 1:
        raise ArgError("--batch-size, --max-slices and --prepare-workers must be positive")
    if args.input is not None and not args.input.is_dir():
        raise ArgError(f"--input {args.input} is not a folder")


def report(rows: list[Row], info: dict[str, str]) -> str:
    raw = {(r.cache, r.workers): r.rate for r in rows if r.source == "h5"}
    lines = [
        "# tumorseg-bench-data: slices/s, packed store vs. one h5 file per slice",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        "| source | page cache | workers | slices | seconds | slices/s | vs. h5 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = raw.get((r.cache, r.workers))
        ratio = f"{r.rate / base:.1f}x" if r.source != "h5" and base else "-"
        lines.append(
            f"| {r.source} | {r.cache} | {r.workers} | {r.slices} | {r.seconds:.2f} "
            f"| {r.rate:,.0f} | {ratio} |"
        )
    return "\n".join([*lines, ""])


def run(args: argparse.Namespace, work: Path) -> str:
    from tumorseg.data import readers
    from tumorseg.data.prepare import prepare

    info: dict[str, str] = {}
    source = args.input
    if source is None:
        source = work / "kaggle"
        done = source / ".complete"
        start = time.perf_counter()
        writer = (
            "reused"
            if done.exists()
            else write_kaggle(source, args.volumes, args.slices, args.size)
        )
        done.touch()
        info["synthetic set"] = (
            f"{args.volumes} volumes x {args.slices} slices at {args.size}x{args.size} "
            f"({writer}, {time.perf_counter() - start:.0f} s)"
        )
    store = work / "store"
    reused = is_complete(store)
    start = time.perf_counter()
    manifest = prepare(source, store, "kaggle-h5", workers=args.prepare_workers, progress=False)
    seconds = time.perf_counter() - start
    total = manifest["total_slices"]
    info["prepare"] = (
        f"store from an earlier run ({total} slices)"
        if reused
        else f"{total} slices in {seconds:.1f} s with {args.prepare_workers} workers = "
        f"{1000 * seconds / total:.1f} s per 1,000 slices (float16, no crop)"
    )
    refs = {r.case_id: r for r in readers.list_cases(source, "kaggle-h5")}
    holder, _ = store_loader(store, args, 0)
    paths = [refs[cid].paths[z] for cid, z in holder.index["train"]]
    del holder, _
    limit = args.max_slices
    info["slices"] = (
        f"{len(paths)} training slices, shuffled, batch {args.batch_size}; timed from the "
        f"first batch on: cold = one epoch, warm = {limit} slices (repeating epochs); store "
        f"image size {args.image_size or 'native'}, augmentation {'on' if args.augment else 'off'}"
    )
    order = refs[next(iter(refs))].channel_order
    store_files = [store / IMAGES, store / LABELS]
    rows, cold_how = [], []
    for workers in args.workers:

        def make_h5(w: int) -> tuple[Any, DataLoader]:
            ds = H5Slices(paths, order)
            return ds, DataLoader(ds, args.batch_size, shuffle=True, num_workers=w)

        rows += measure("h5", make_h5, paths, workers, limit, args.cold, cold_how)
        rows += measure(
            "store",
            lambda w: store_loader(store, args, w),
            store_files,
            workers,
            limit,
            args.cold,
            cold_how,
        )
    info["cold cache"] = "; ".join(sorted(set(cold_how)))
    info["machine"] = f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    return report(rows, info)


def main(argv: list[str] | None = None) -> int:
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    from tumorseg.core.errors import DataError

    temporary = args.work is None  # a --work folder is kept for reruns
    work = Path(tempfile.mkdtemp(prefix="tumorseg-bench-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        text = run(args, work)
    except DataError as err:
        console.error(PROG, str(err))
        return 2
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.output:
        write_atomically([(args.output, lambda p: p.write_text(text))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
