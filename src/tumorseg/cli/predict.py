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

Inference replays the preprocessing recorded in the checkpoint (``tumorseg.inference.predict`` and
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
  model's Python source is never run (``tumorseg.tracking.mlflow_model``);
* ``--onnx FILE``: a ``tumorseg-export`` ONNX file, run by onnxruntime (fp32) through the same
  preprocessing replay, read from the file's metadata.

``--run`` and ``--model`` are resolved in ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``,
else the project's local store (``tumorseg.tracking.client.default_tracking_uri``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.errors import DataError
from tumorseg.core.labels import CONVENTIONS
from tumorseg.data.case import MODALITIES
from tumorseg.inference.folder import OVERLAY_MODALITIES, plan, segment, throughput
from tumorseg.inference.predict import (
    load_for_inference,
)

if TYPE_CHECKING:
    from tumorseg.training.module import SegModule

PROG = "tumorseg-predict"

log = logging.getLogger(__name__)


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
    add("--min-et-voxels", type=console.count(0), default=0, metavar="N", help="small ET -> NCR")
    add("--overlay", type=Path, metavar="PNG", help="overlay figure (a folder for many cases)")
    add("--overlay-modality", choices=OVERLAY_MODALITIES, default="flair", help="default flair")
    add("--batch-size", type=console.count(1), default=32, metavar="B", help="slices per pass (32)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    add("--compile", action="store_true", help="torch.compile the net (GPUs, many cases)")
    add("--trust-checkpoint", action="store_true", help="load objects other than plain data")
    add("--quiet", action="store_true", help="no progress bar")
    add("--benchmark", action="store_true", help="time one demo case; print a Markdown table")
    add("--repeats", type=console.count(1), default=5, metavar="N", help="timed rounds (5)")
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
        from tumorseg.inference.export import OnnxRunner

        yield OnnxRunner(args.onnx)
    elif args.checkpoint is not None:
        yield load_for_inference(args.checkpoint, args.device, args.trust_checkpoint, args.compile)
    else:
        from tumorseg.tracking.client import default_tracking_uri
        from tumorseg.tracking.registry import resolve_checkpoint, temp_dir

        uri = args.tracking_uri or default_tracking_uri()
        with temp_dir() as tmp:
            ckpt = resolve_checkpoint(None, args.run, args.model, uri, Path(tmp))
            yield load_for_inference(ckpt, args.device, args.trust_checkpoint, args.compile)


def error(message: str) -> None:
    console.error(PROG, message)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    try:
        if args.benchmark:
            from tumorseg.bench.inference import bench

            console.error(
                PROG, "note: write 'tumorseg-bench inference' (--benchmark is its old name)"
            )
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
