"""Convert a BraTS source (Kaggle h5, BraTS NIfTI, MSD) into a slice store (``prepare``, behind
``tumorseg-prepare``).

Each case is read with ``tumorseg.data.readers``, brought onto the training grid, z-scored and
optionally cropped in-plane to ``N x N`` around the brain (never cutting tumour), all by
``tumorseg.data.preprocess``, and written as
its own files in ``DST.partial/cases/``; a rerun skips the cases already there. Then the case
files are copied one at a time into ``images.npy`` / ``labels.npy`` (memory-mapped), the content
hash is computed on the way, ``manifest.json`` is written last and ``DST.partial`` is renamed to
``DST``. So ``DST`` only ever appears complete. See ``tumorseg.data.store`` for the layout::

    tumorseg-prepare --input /data/BraTS2020_training_data --output data/stores/kaggle --workers 2
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.core.console import progress_bar
from tumorseg.core.errors import DataError
from tumorseg.core.files import folder_lock
from tumorseg.core.labels import MASK_ORDER
from tumorseg.core.processes import exit_with_parent
from tumorseg.data.case import MODALITIES, Case
from tumorseg.data.preprocess import (
    ORIENTATION,
    SPACING,
    Preprocessing,
    brain_mask,
    crop_origin,
    to_training_grid,
    window,
    zscore,
)
from tumorseg.data.store import (
    DTYPES,
    FORMAT_VERSION,
    IMAGES,
    LABELS,
    MANIFEST,
    SLICE_DTYPE,
    SLICES,
    is_complete,
    partial_path,
    read_json,
    save_array,
    slice_counts,
    update_hash,
    write_json,
)

log = logging.getLogger(__name__)
CASES = "cases"  # per-case results inside DST.partial
OPTIONS = "options.json"  # the options DST.partial was started with


# ---------------------------------------------------------------- one case (runs in workers)


def intensity_stats(image: np.ndarray, brain: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-modality mean, std, p1 and p99 over brain voxels of the raw ``image (4, X, Y, Z)``."""
    stats = {}
    for name, channel in zip(MODALITIES, image, strict=True):
        values = channel[brain] if brain.any() else channel.ravel()
        p1, p99 = np.percentile(values, [1, 99])
        stats[name] = {
            "mean": float(values.mean(dtype=np.float64)),
            "std": float(values.std(dtype=np.float64)),
            "p1": float(p1),
            "p99": float(p99),
        }
    return stats


def convert(
    case: Case, dtype: str, crop: int | None, pre: Preprocessing | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Normalised slices ``(Z, 4, H, W)`` in ``dtype``, labels ``(Z, H, W)`` and a summary.

    The steps are ``tumorseg.data.preprocess``'s: orientation and in-plane spacing of ``pre``,
    z-score, and the crop window (which, for training, also holds the whole tumour).
    """
    if case.seg is None:
        raise DataError(f"{case.case_id}: no segmentation")
    pre = pre or Preprocessing()
    grid = to_training_grid(case.image, case.seg, case.affine, pre, case.case_id)
    image, seg, affine = grid.image, grid.seg, grid.affine
    brain = brain_mask(image)
    stats = intensity_stats(image, brain)
    volume_shape = seg.shape
    image = zscore(image)
    origin = None
    if crop:
        origin = crop_origin(brain, seg > 0, crop, case.case_id)
        image = window(image, origin, crop, (1, 2))
        seg = window(seg, origin, crop, (0, 1))
    affine = np.array(affine, dtype=float)
    if origin:  # the stored voxel (0, 0) is the source voxel ``origin``
        affine[:3, 3] += affine[:3, :2] @ np.asarray(origin, dtype=float)
    slices = np.ascontiguousarray(image.transpose(3, 0, 1, 2), dtype=dtype)
    labels = np.ascontiguousarray(seg.transpose(2, 0, 1), dtype=np.uint8)
    counts = np.bincount(labels.ravel(), minlength=4)
    summary = {
        "id": case.case_id,
        "count": len(labels),
        "shape": list(labels.shape[1:]),
        "volume_shape": list(volume_shape),
        "crop_origin": list(origin) if origin else None,
        "affine": affine.tolist(),
        "stats": stats,
        "label_counts": {str(k): int(v) for k, v in enumerate(counts)},
    }
    return slices, labels, summary


def case_stem(case_id: str) -> str:
    """A file-name-safe stem for a case id."""
    return re.sub(r"[^\w.-]", "_", case_id)


def process_case(ref: Any, cases_dir: Path, dtype: str, crop: int | None) -> dict:
    """Load, normalise and write one case into ``cases_dir``; returns its summary, or
    ``{"id", "error"}`` for bad input. The summary JSON is written last: it marks the case done."""
    try:
        slices, labels, summary = convert(ref.load(), dtype, crop)
    except DataError as err:
        return {"id": ref.case_id, "error": str(err)}
    stem = cases_dir / case_stem(ref.case_id)
    save_array(f"{stem}.images.npy", slices)
    save_array(f"{stem}.labels.npy", labels)
    save_array(f"{stem}.slices.npy", slice_counts(slices, labels))
    write_json(f"{stem}.json", summary)
    return summary


# ---------------------------------------------------------------- the whole store


def _options(
    src: Path, fmt: str, dtype: str, crop: int | None, order: Sequence[str], convention: str | None
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source": str(src),
        "format": fmt,
        "dtype": dtype,
        "crop": crop,
        "orientation": ORIENTATION,
        "spacing": list(SPACING),
        "channel_order": list(order),
        "convention": convention,
    }


def check_options(dtype: str, crop: int | None, workers: int) -> None:
    """ValueError for option values ``prepare`` cannot work with."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if crop is not None and (not isinstance(crop, int) or crop < 1):
        raise ValueError(f"crop must be a positive number of voxels, got {crop!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def _start_partial(partial: Path, options: dict) -> None:
    """Create ``DST.partial``, or reuse it when it was started with the same options."""
    if partial.exists() and (partial / OPTIONS).is_file():
        if read_json(partial / OPTIONS) == options:
            return
        log.warning("%s was started with other options: starting over", partial)
        for child in partial.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    (partial / CASES).mkdir(parents=True, exist_ok=True)
    write_json(partial / OPTIONS, options)


def _packed(partial: Path, options: dict) -> dict | None:
    """The manifest of a ``DST.partial`` that was packed with ``options`` but not renamed."""
    if not is_complete(partial):
        return None
    manifest = read_json(partial / MANIFEST)
    return manifest if all(manifest.get(k) == v for k, v in options.items()) else None


def _finished(cases_dir: Path, refs: list) -> dict[str, dict]:
    """Summaries of the cases a previous run finished (their JSON marker exists)."""
    done = {}
    for ref in refs:
        marker = cases_dir / f"{case_stem(ref.case_id)}.json"
        if marker.is_file():
            done[ref.case_id] = read_json(marker)
    return done


def start_method() -> str:
    """``fork`` on Linux: workers start at once, even from ``python -`` or a notebook, and
    only run numpy, h5py and nibabel code (no torch ops, which are not fork-safe). Elsewhere
    ``spawn`` (fork is unsafe on macOS and missing on Windows)."""
    methods = multiprocessing.get_all_start_methods()
    return "fork" if sys.platform.startswith("linux") and "fork" in methods else "spawn"


def _run_cases(
    refs: list, cases_dir: Path, dtype: str, crop: int | None, workers: int, on_done: Callable
) -> None:
    """Process ``refs`` (in this process for one worker, else in a process pool), calling
    ``on_done(result)`` as each finishes; ``on_done`` may raise to stop the run."""
    if workers == 1 or len(refs) <= 1:
        for ref in refs:
            on_done(process_case(ref, cases_dir, dtype, crop))
        return
    ctx = multiprocessing.get_context(start_method())
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        pending: set[Future] = set()
        todo = iter(refs)
        try:
            while True:
                # keep at most 2 cases per worker in flight: results go to disk as they come
                while len(pending) < 2 * workers and (ref := next(todo, None)) is not None:
                    pending.add(pool.submit(process_case, ref, cases_dir, dtype, crop))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_done(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _check_shapes(summaries: list[dict]) -> list[tuple[str, str]]:
    """``(id, reason)`` of cases whose in-plane size differs from the first case's."""
    if not summaries:
        return []
    ref = summaries[0]
    return [
        (
            s["id"],
            f"{s['id']}: slice size {tuple(s['shape'])} differs from {tuple(ref['shape'])} of "
            f"{ref['id']}; use --crop N for a common size",
        )
        for s in summaries
        if s["shape"] != ref["shape"]
    ]


def _pack(partial: Path, summaries: list[dict], dtype: str, progress: Any) -> tuple[str, int]:
    """Copy the case files one at a time into the packed arrays (hashing them on the way);
    returns the content hash and the number of slices."""
    cases_dir = partial / CASES
    total = sum(s["count"] for s in summaries)
    h, w = summaries[0]["shape"]
    images = np.lib.format.open_memmap(partial / IMAGES, "w+", np.dtype(dtype), (total, 4, h, w))
    labels = np.lib.format.open_memmap(partial / LABELS, "w+", np.uint8, (total, h, w))
    slices = np.empty(total, dtype=SLICE_DTYPE)
    hasher = hashlib.sha256()
    task = progress.add_task("Packing slices", total=2 * total)
    for name, out in (("images", images), ("labels", labels)):
        first = 0
        for s in summaries:
            stem = cases_dir / case_stem(s["id"])
            part = np.load(f"{stem}.{name}.npy", mmap_mode="r")
            out[first : first + s["count"]] = part
            update_hash(hasher, out[first : first + s["count"]])
            if name == "images":
                slices[first : first + s["count"]] = np.load(f"{stem}.slices.npy")
            first += s["count"]
            progress.advance(task, s["count"])
            del part
        out.flush()
    del images, labels
    save_array(partial / SLICES, slices)
    return hasher.hexdigest(), total


def _publish(partial: Path, dst: Path) -> None:
    """Rename the finished ``DST.partial`` to ``DST`` (replacing an old store, ``--force``)."""
    old = None
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(partial, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _SkipCollector(logging.Handler):
    """Collects the ``skipping <problem>`` warnings the readers log while listing cases."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.skipped: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("skipping "):
            problem = message[len("skipping ") :]
            self.skipped[problem.split(": ", 1)[0]] = problem


@contextmanager
def _reader_skips() -> Iterator[dict[str, str]]:
    """``{file: problem}`` of the inputs ``readers.list_cases(skip_bad=True)`` leaves out."""
    handler = _SkipCollector()
    logger = logging.getLogger("tumorseg.data.readers")
    logger.addHandler(handler)
    try:
        yield handler.skipped
    finally:
        logger.removeHandler(handler)


def _check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and not is_complete(dst) and any(dst.iterdir()) and not force:
        raise DataError(f"{dst}: exists and is not a slice store; use --force to replace it")


def prepare(
    src: str | Path,
    dst: str | Path,
    fmt: str = "auto",
    dtype: str = "float16",
    crop: int | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = True,
    *,
    channel_order: Sequence[str] = MODALITIES,
    convention: str | None = None,
    mask_order: Sequence[str] = MASK_ORDER,
    force: bool = False,
) -> dict:
    """Convert the data set at ``src`` into a slice store at ``dst``; returns its manifest.

    A complete store at ``dst`` is returned as it is unless ``force``. Bad input raises
    ``DataError`` (``skip_bad``: such cases are left out and listed in ``manifest["skipped"]``).
    ``channel_order`` names the stored Kaggle image channels, ``mask_order`` its one-hot mask
    channels; ``convention`` overrides the label convention of the format (see
    ``tumorseg.data.readers.list_cases``).
    """
    from tumorseg.data import readers

    check_options(dtype, crop, workers)
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if is_complete(dst) and not force:
        log.info("%s: slice store already complete", dst)
        return read_json(dst / MANIFEST)
    _check_destination(dst, force)
    if not src.is_dir():
        raise DataError(f"{src}: data directory does not exist")
    start = time.perf_counter()
    with _reader_skips() as listed_bad:
        refs = readers.list_cases(
            src,
            fmt,
            True,
            tuple(channel_order),
            skip_bad=skip_bad,
            convention=convention,
            mask_order=tuple(mask_order),
        )
    if not refs:
        raise DataError(f"{src}: no labelled cases found")
    fmt = refs[0].format
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dst)
    partial.mkdir(exist_ok=True)
    with folder_lock(partial):
        if is_complete(dst) and not force:  # another process finished it while we waited
            shutil.rmtree(partial, ignore_errors=True)
            return read_json(dst / MANIFEST)
        options = _options(src, fmt, dtype, crop, channel_order, convention)
        if fmt == "kaggle-h5":
            options["mask_order"] = list(mask_order)
        manifest = _packed(partial, options)
        if manifest is None:  # not interrupted between the manifest and the rename
            _start_partial(partial, options)
            with progress_bar(quiet=not progress, transient=False) as bar:
                manifest = _build(refs, partial, options, workers, skip_bad, bar, listed_bad)
        _publish(partial, dst)
    seconds = time.perf_counter() - start
    n_slices, n_cases = manifest["total_slices"], len(manifest["cases"])
    log.info("%s: %d slices of %d cases in %.1f s", dst, n_slices, n_cases, seconds)
    return manifest


def _build(
    refs: list,
    partial: Path,
    options: dict,
    workers: int,
    skip_bad: bool,
    bar: Any,
    listed_bad: dict[str, str],
) -> dict:
    """Process the missing cases, pack the arrays and write the manifest into ``partial``."""
    cases_dir = partial / CASES
    results = _finished(cases_dir, refs)
    todo = [r for r in refs if r.case_id not in results]
    if results:
        log.info("%s: resuming, %d of %d cases already done", partial, len(results), len(refs))
    task = bar.add_task(f"Preparing {options['format']} cases", total=len(refs))
    bar.advance(task, len(results))
    bad = dict(listed_bad)

    def on_done(result: dict) -> None:
        if "error" in result:
            if not skip_bad:
                raise DataError(result["error"])
            log.warning("skipping %s", result["error"])
            bad[result["id"]] = result["error"]
        else:
            results[result["id"]] = result
        bar.advance(task)

    _run_cases(todo, cases_dir, options["dtype"], options["crop"], workers, on_done)
    summaries = [results[r.case_id] for r in refs if r.case_id in results]
    for cid, reason in _check_shapes(summaries):
        if not skip_bad:
            raise DataError(reason)
        bad[cid] = reason
    summaries = [s for s in summaries if s["id"] not in bad]
    if not summaries:
        raise DataError(f"{options['source']}: no usable case (all {len(refs)} are bad)")
    digest, total = _pack(partial, summaries, options["dtype"], bar)
    first = np.cumsum([0] + [s["count"] for s in summaries])
    cases = [{"id": s["id"], "first": int(f), **s} for s, f in zip(summaries, first, strict=False)]
    manifest = {
        **options,
        "shape": summaries[0]["shape"],
        "total_slices": total,
        "cases": cases,
        "skipped": [{"id": cid, "reason": reason} for cid, reason in sorted(bad.items())],
        "hash": digest,
    }
    write_json(partial / MANIFEST, manifest)
    shutil.rmtree(cases_dir)
    (partial / OPTIONS).unlink()
    return manifest
