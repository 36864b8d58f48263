"""Segmenting a folder (or one case) as ``tumorseg-predict`` does: plan the jobs from the
arguments, read the next case while the net runs on this one, write each result all or
nothing, and report cases per minute.

``plan`` and ``segment`` take a :class:`Request`: ``tumorseg-predict``'s parsed arguments, or
one built in code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from tumorseg.core import console
from tumorseg.core.errors import DataError, first_line
from tumorseg.core.files import staged_outputs
from tumorseg.core.labels import from_canonical
from tumorseg.data.case import MODALITIES, SUFFIXES, Case, read_images
from tumorseg.data.preprocess import NetInput
from tumorseg.data.readers import CaseRef, list_cases, read_any
from tumorseg.inference.predict import finish_case, label_slices, prepare_case, segmentation_image

if TYPE_CHECKING:
    from tumorseg.training.module import SegModule

OVERLAY_MODALITIES = ("flair", "t1ce")

log = logging.getLogger(__name__)


@dataclass
class Request:
    """What to segment and how (the fields of ``tumorseg-predict``'s arguments)."""

    output: Path
    input: Path | None = None  # a case folder, an MSD image or a folder of cases
    flair: Path | None = None  # or the four modality files
    t1: Path | None = None
    t1ce: Path | None = None
    t2: Path | None = None
    labels: str | None = None  # output convention; None: the input's own
    tta: bool = False
    min_et_voxels: int = 0
    overlay: Path | None = None
    overlay_modality: str = "flair"
    batch_size: int = 32
    quiet: bool = False


# ---------------------------------------------------------------- inputs


@dataclass
class Job:
    """One case to segment and where its results go."""

    case_id: str
    load: Callable[[], Case]
    reference: Path  # file whose header geometry the output copies
    convention: str  # the input's own label convention
    output: Path
    overlay: Path | None = None


def strip_nifti(name: str) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def explicit_case(paths: list[Path]) -> tuple[str, Callable[[], Case], str]:
    """Case id, loader and convention of four files given as ``--flair --t1 --t1ce --t2``."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    stem = strip_nifti(paths[0].name)
    new = stem.endswith("-t2f")
    cid = stem.removesuffix("-t2f" if new else "_flair") or stem

    def load() -> Case:
        image, affine = read_images(paths)
        return Case(cid, image, None, affine)

    return cid, load, "brats2023" if new else "brats2020"


def case_refs(root: Path) -> tuple[list[CaseRef], bool]:
    """Cases of a folder input, and whether the folder is itself one case folder."""
    refs = list_cases(root, labelled=False)
    if not refs:
        raise DataError(f"{root}: no cases found")
    single = len(refs) == 1 and refs[0].paths[0].parent == root and refs[0].format == "brats"
    ids = [r.case_id for r in refs]
    dup = next((c for c in ids if ids.count(c) > 1), None)
    if dup:
        raise DataError(f"{root}: case id {dup} appears twice")
    return refs, single


def target_path(given: Path, case_id: str, suffix: str, many: bool, flag: str) -> Path:
    """Output file of a case: ``given`` itself (one case, a file name), else inside it."""
    if many or given.is_dir():
        if given.exists() and not given.is_dir():
            raise DataError(f"{flag} {given}: must be a folder for a folder of cases")
        return given / f"{case_id}{suffix}"
    return given


def check_output_name(path: Path, suffixes: tuple[str, ...], flag: str) -> None:
    if not path.name.endswith(suffixes):
        raise DataError(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")


def plan(args: Request) -> list[Job]:
    """The cases named on the command line, with their output files. Reads headers only."""
    explicit = [args.flair, args.t1, args.t1ce, args.t2]
    with_seg = args.overlay is not None  # the seg is read only as the overlay's ground truth
    jobs: list[Job] = []
    many = False
    if args.input is None:
        cid, load, convention = explicit_case(explicit)
        jobs.append(Job(cid, load, explicit[0], convention, args.output))
    elif args.input.is_file():
        load = functools.partial(read_any, args.input, "msd", None if with_seg else False)
        jobs.append(Job(strip_nifti(args.input.name), load, args.input, "msd", args.output))
    elif args.input.is_dir():
        refs, single = case_refs(args.input)
        many = not single
        for ref in refs:
            ref = ref if with_seg else dataclasses.replace(ref, labelled=False)
            jobs.append(Job(ref.case_id, ref.load, ref.paths[0], ref.convention, args.output))
    else:
        raise DataError(f"{args.input}: no such file or directory")
    for job in jobs:
        job.output = target_path(args.output, job.case_id, ".nii.gz", many, "--output")
        check_output_name(job.output, SUFFIXES, "--output")
        if args.overlay is not None:
            job.overlay = target_path(args.overlay, job.case_id, ".png", many, "--overlay")
            check_output_name(job.overlay, (".png",), "--overlay")
    return jobs


# ---------------------------------------------------------------- outputs


def reference_header(path: Path) -> nib.Nifti1Header:
    """Header of the input file whose geometry the output copies."""
    try:
        return nib.load(path).header
    except Exception as err:  # nibabel raises several types for broken files
        raise DataError(f"{path}: cannot read NIfTI header ({first_line(err)})") from None


def save_overlay(path: Path, case: Case, labels: np.ndarray, modality: str) -> None:
    """The overlay PNG of one case (ground truth drawn when the case has a seg)."""
    from tumorseg.inference.overlay import overlay_figure

    fig = overlay_figure(
        case.image[MODALITIES.index(modality)],
        case.seg,
        labels,
        case.affine,
        title=case.case_id,
        modality=modality.upper() if modality == "flair" else "T1ce",
    )
    fig.savefig(path, format="png", dpi=100, facecolor=fig.get_facecolor())


# ---------------------------------------------------------------- run


def read_job(job: Job, module: SegModule) -> tuple[nib.Nifti1Header, Case, NetInput]:
    """The header the output copies, the case and its preprocessing replay (the reader
    thread's part)."""
    header, case = reference_header(job.reference), job.load()
    return header, case, prepare_case(module, case)


def write_job(
    args: Request,
    job: Job,
    case: Case,
    replay: NetInput,
    oriented: np.ndarray,
    header: nib.Nifti1Header,
    paths: tuple[Path, Path | None],
) -> None:
    """The segmentation (and overlay) of one case into its temporary files, from its labels
    in the training orientation (the writer thread's part)."""
    labels = finish_case(replay, oriented, args.min_et_voxels)
    convention = args.labels or job.convention
    image = segmentation_image(from_canonical(labels, convention), case.affine, header)
    nib.save(image, paths[0])
    if paths[1] is not None:
        save_overlay(paths[1], case, labels, args.overlay_modality)
    log.info("%s: %s labels, %d tumour voxels", job.case_id, convention, (labels > 0).sum())


class Inline:
    """An executor that runs each task at once, in the calling thread."""

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable, *args: object) -> Future:
        done: Future = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as err:  # raised where the result is asked for, as a thread's
            done.set_exception(err)
        return done


def spare_cores(module: SegModule) -> bool:
    """Whether reading and writing threads have cores to themselves: the net runs on a GPU, or
    torch's threads leave CPU cores free. On the 2-core dev machine with torch's 2 threads,
    threads beside the net slowed every case (docs/benchmarks.md), so cases run in turn."""
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return module.device.type != "cpu" or (cores or 1) > torch.get_num_threads()


def segment(args: Request, jobs: list[Job], module: SegModule) -> float:
    """Predict every job and write its outputs, all or nothing; returns the seconds it took.

    Where there are spare cores (``spare_cores``), cases are pipelined: one thread reads and
    preprocesses the next case and another maps the previous one back and writes it while the
    net runs on this one; else the same steps run in turn.
    """
    from concurrent.futures import ThreadPoolExecutor

    pipelined = spare_cores(module)
    start = time.perf_counter()
    with (
        staged_outputs() as temp_for,
        console.progress_bar(args.quiet) as bar,
        ThreadPoolExecutor(1, thread_name_prefix="read") if pipelined else Inline() as reader,
        ThreadPoolExecutor(1, thread_name_prefix="write") if pipelined else Inline() as writer,
    ):
        cases_task = bar.add_task("cases", total=len(jobs))
        slices_task = bar.add_task("slices", total=None)
        writes: list[Future] = []
        upcoming = reader.submit(read_job, jobs[0], module) if jobs else None
        for i, job in enumerate(jobs):
            header, case, replay = upcoming.result()
            if i + 1 < len(jobs):
                upcoming = reader.submit(read_job, jobs[i + 1], module)
            bar.reset(slices_task, total=case.image.shape[3], description=job.case_id)
            labels = label_slices(
                module,
                replay,
                tta=args.tta,
                batch_size=args.batch_size,
                progress=lambda n: bar.advance(slices_task, n),
            )
            paths = (temp_for(job.output), temp_for(job.overlay) if job.overlay else None)
            if writes:
                writes[-1].result()  # one case waiting to be written at most
            writes.append(writer.submit(write_job, args, job, case, replay, labels, header, paths))
            bar.advance(cases_task)
        for done in writes:
            done.result()
    took = time.perf_counter() - start
    for job in jobs:
        print(f"wrote {job.output}" + (f" and {job.overlay}" if job.overlay else ""))
    return took


def throughput(cases: int, seconds: float) -> str:
    """``N cases in S s (R cases/min, T s/case)``: reading, prediction and writing."""
    rate = 60 * cases / seconds if seconds > 0 else float("inf")
    return f"{cases} cases in {seconds:.1f} s ({rate:.1f} cases/min, {seconds / cases:.2f} s/case)"
