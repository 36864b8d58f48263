"""Segment new patients with a trained checkpoint: ``tumorseg-predict``.

Inputs, one of:

* ``--input CASE_DIR``: a BraTS case folder, 2020/2021 naming ``ID/ID_{flair,t1,t1ce,t2}.nii[.gz]``
  or 2023 naming ``ID/ID-{t2f,t1n,t1c,t2w}.nii[.gz]``; a ``seg`` file is optional (only the
  overlay uses it, as ground truth);
* ``--input IMAGE``: an MSD Task01 4D image ``(X, Y, Z, 4)`` (its label in ``../labelsTr/``, if
  any, is the overlay's ground truth);
* ``--input ROOT``: a folder of BraTS case folders or an MSD Task01 folder (``imagesTr/``,
  ``imagesTs/``); ``--output`` is then a folder receiving ``<case_id>.nii.gz`` per case;
* ``--flair F --t1 F --t1ce F --t2 F``: four 3D NIfTI files given explicitly (no ``--input``).

Output: a uint8 segmentation NIfTI with the input's shape, affine, qform/sform codes and units
(copied from the header of the first modality file, or of the MSD image). Labels follow
``--labels``; by default the input's own convention: ``brats2023`` (0/1/2/3) for 2023 naming,
``msd`` (1 edema, 2 non-enhancing, 3 enhancing) for MSD images, ``brats2020`` (0/1/2/4)
otherwise.

Inference replays the preprocessing recorded in the checkpoint (``tumorseg.inference`` and
``tumorseg.data.preprocess``): orientation, in-plane spacing, z-score, crop, slice filter and
resize, and maps the result back onto the input's own grid. Slices go through the net in
batches, in bf16 autocast with channels-last memory on CPUs with native bf16 (and on GPUs),
fp32 otherwise. ``--tta`` averages the probabilities over four flips of each slice.

``--min-et-voxels N`` relabels enhancing-tumour connected components (26-connected, in 3D) of
fewer than N voxels as necrotic core (NCR): they stay in the tumour core and whole tumour, as
is usual in BraTS post-processing, but no longer count as enhancing.

Bad input (missing modality, unreadable file, mismatched geometry, bad checkpoint) prints one
line naming the file and exits with status 2; nothing is written, also for a folder of cases
(all outputs are written to temporary files and renamed at the end).

``tumorseg-predict --benchmark [--checkpoint CKPT]`` times one demo case (240x240x155) with and
without TTA next to a naive one-slice-at-a-time fp32 loop, and prints a Markdown table
(``tumorseg.bench.inference``).

Checkpoints are read as data: one holding other objects is refused unless
``--trust-checkpoint``.

The model, one of:

* ``--checkpoint CKPT``: a checkpoint file;
* ``--run RUN_ID``: an MLflow run's kept checkpoint (its ``checkpoints/`` artifacts);
* ``--model URI``: an MLflow model, ``runs:/<run_id>/model``, ``models:/<name>@<alias>`` or
  ``models:/<name>/<version>``; its checkpoint artifact is downloaded and read as data, the
  model's Python source is never run (``tumorseg.mlflow_model``);
* ``--onnx FILE``: a ``tumorseg-export`` ONNX file, run by onnxruntime (fp32) through the same
  preprocessing replay, read from the file's metadata.

``--run`` and ``--model`` are resolved in ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``,
else the project's local store (``tumorseg.tracking.default_tracking_uri``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from tumorseg import cli
from tumorseg.cli import ArgError, Parser
from tumorseg.data.nifti import MODALITIES, SUFFIXES, Case, read_images
from tumorseg.data.preprocess import NetInput
from tumorseg.data.readers import CaseRef, list_cases, read_any
from tumorseg.errors import DataError, first_line
from tumorseg.inference import (
    finish_case,
    label_slices,
    load_for_inference,
    prepare_case,
    segmentation_image,
)
from tumorseg.labels import CONVENTIONS, from_canonical
from tumorseg.outputs import staged_outputs

if TYPE_CHECKING:
    from tumorseg.module import SegModule

PROG = "tumorseg-predict"
OVERLAY_MODALITIES = ("flair", "t1ce")

log = logging.getLogger(__name__)


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


def plan(args: argparse.Namespace) -> list[Job]:
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
    from tumorseg.overlay import overlay_figure

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
    args: argparse.Namespace,
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


def segment(args: argparse.Namespace, jobs: list[Job], module: SegModule) -> float:
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
        cli.progress_bar(args.quiet) as bar,
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


# ---------------------------------------------------------------- command line


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Segment brain tumours with a trained checkpoint.",
        epilog="Input: --input PATH (case folder, MSD 4D image or folder of cases), or the four "
        "files --flair F --t1 F --t1ce F --t2 F. Bad input exits 2 and writes nothing.",
    )
    add = parser.add_argument
    add("--checkpoint", type=Path, metavar="CKPT", help="trained .ckpt (stores its config)")
    add("--run", metavar="RUN_ID", help="an MLflow run: the checkpoint it kept")
    add("--model", metavar="URI", help="an MLflow model: runs:/<id>/model, models:/<name>@<alias>")
    add("--onnx", type=Path, metavar="FILE", help="a tumorseg-export ONNX file (onnxruntime)")
    add("--tracking-uri", metavar="URI", help="MLflow store for --run/--model (default: project)")
    add("--input", type=Path, metavar="PATH", help="case folder, MSD 4D image, or case folders")
    for mod in MODALITIES:
        add(f"--{mod}", type=Path, metavar="F", help=f"{mod} NIfTI file (the four, no --input)")
    add("--output", type=Path, metavar="PATH", help=".nii.gz file (a folder for many cases)")
    add("--labels", choices=sorted(CONVENTIONS), help="output convention (default: the input's)")
    add("--tta", action="store_true", help="average probabilities over 4 flips per slice")
    add("--min-et-voxels", type=cli.count(0), default=0, metavar="N", help="small ET -> NCR")
    add("--overlay", type=Path, metavar="PNG", help="overlay figure (a folder for many cases)")
    add("--overlay-modality", choices=OVERLAY_MODALITIES, default="flair", help="default flair")
    add("--batch-size", type=cli.count(1), default=32, metavar="B", help="slices per pass (32)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    add("--compile", action="store_true", help="torch.compile the net (GPUs, many cases)")
    add("--trust-checkpoint", action="store_true", help="load objects other than plain data")
    add("--quiet", action="store_true", help="no progress bar")
    add("--benchmark", action="store_true", help="time one demo case; print a Markdown table")
    add("--repeats", type=cli.count(1), default=5, metavar="N", help="timed rounds (5)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.benchmark:
        return
    explicit = [getattr(args, m) for m in MODALITIES]
    given = [f for f in ("checkpoint", "run", "model", "onnx") if getattr(args, f) is not None]
    if len(given) != 1:
        raise ArgError("give one of --checkpoint, --run, --model or --onnx")
    if args.output is None:
        raise ArgError("--output is required")
    if args.input is not None and any(explicit):
        raise ArgError("give --input or the four --flair --t1 --t1ce --t2 files, not both")
    if args.input is None and not all(explicit):
        missing = [f"--{m}" for m, p in zip(MODALITIES, explicit, strict=True) if p is None]
        raise ArgError(
            "give --input, or all four modality files (missing " + " ".join(missing) + ")"
        )


@contextlib.contextmanager
def model_for(args: argparse.Namespace) -> Iterator[SegModule]:
    """The module (or ONNX runner) the arguments name; downloads live until the block ends."""
    if args.onnx is not None:
        from tumorseg.export import OnnxRunner

        yield OnnxRunner(args.onnx)
    elif args.checkpoint is not None:
        yield load_for_inference(args.checkpoint, args.device, args.trust_checkpoint, args.compile)
    else:
        from tumorseg.registry import resolve_checkpoint, temp_dir
        from tumorseg.tracking import default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri()
        with temp_dir() as tmp:
            ckpt = resolve_checkpoint(None, args.run, args.model, uri, Path(tmp))
            yield load_for_inference(ckpt, args.device, args.trust_checkpoint, args.compile)


def error(message: str) -> None:
    cli.error(PROG, message)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = cli.start(PROG, lambda: cli.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    try:
        if args.benchmark:
            from tumorseg.bench.inference import bench

            print(bench(args.checkpoint, args.device, args.repeats, args.batch_size))
            return 0
        jobs = plan(args)
        with model_for(args) as module:
            took = segment(args, jobs, module)
        if len(jobs) > 1:
            print(throughput(len(jobs), took))
    except DataError as err:
        error(str(err))
        return 2
    except OSError as err:
        error(f"cannot write: {err}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
