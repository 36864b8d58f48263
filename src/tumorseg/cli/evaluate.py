"""Score predicted segmentations against references, per case and BraTS region.

``tumorseg-evaluate`` pairs prediction files ``PRED/<case_id>.nii[.gz]`` with the references
in ``REF``, found as ``tumorseg-prepare`` finds them: BraTS 2020/2021 case folders
(``<id>/<id>_seg``, also the case-355 ``W39_1998.09.19_Segm.nii``), BraTS 2023+ case folders
(``<id>/<id>-seg``), an MSD ``Task01_BrainTumour`` (``labelsTr/<id>``), and flat files
``<id>.nii[.gz]``, ``<id>_seg``, ``<id>-seg`` (also a bare ``labelsTr`` folder, or case
folders holding only their segmentation). Each reference's label convention follows its layout
(``_seg`` BraTS 2020, ``-seg`` BraTS 2023, MSD); ``--labels`` sets it where the layout does not
say (flat ``<id>.nii.gz``: BraTS 2020 by default) and overrides it everywhere when given.
Predictions are read in ``--pred-labels``, else in their reference's convention, and brought
into the reference's. Both are scored per case and region of that convention (WT, TC, ET, NETC,
SNFH, and RC for ``brats2024``): Dice, IoU, pixel accuracy, sensitivity, specificity and HD95
(mm, voxel spacing from the reference's header)::

    tumorseg-evaluate --predictions preds --references data/BraTS2020 --output out/metrics.csv

It writes ``metrics.csv`` (one row per case and region, with NSD and the lesion-wise BraTS
metrics), ``metrics_summary.csv`` (mean, median, std and a bootstrap 95% CI of the mean per
metric and region), ``metrics_boxplot.png`` (Dice and HD95 per region) and
``metrics_lesions.csv`` (one row per matched, missed or false lesion), all atomically, and
prints the means. ``--hd95 pooled|max`` picks the HD95 convention (``max`` names the columns
``hd95_max``...); ``--nsd-tolerance MM`` sets the NSD tolerance (default: the official
evaluator's, see ``tumorseg.evaluation.lesions``).
Both CSVs name the convention in their last column, ``hd95_convention``.
``--mlflow-run ID`` also logs the means as ``case/<metric>_<region>``, the tag
``hd95_convention`` (``pooled`` or ``max``) and the files as artifacts of that run.
``--overlays DIR`` writes a three-view PNG per case whose reference
sits in a data set with images (BraTS 2020/2021 or 2023+ case folders, MSD), with the FLAIR
as ``tumorseg-prepare`` reads it.

Finding references, label conventions and reading the files are
``tumorseg.evaluation.references``'s; metrics, empty-mask rules and the HD95 convention are
``tumorseg.evaluation.cases``'s.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.errors import DataError
from tumorseg.core.labels import CONVENTIONS
from tumorseg.evaluation.cases import (
    HD95_CONVENTIONS,
    log_to_mlflow,
    means_table,
    output_paths,
    summarise,
    write_outputs,
)
from tumorseg.evaluation.references import Pair, overlay_writers, paired_cases, score_all
from tumorseg.tracking.client import run_client

PROG = "tumorseg-evaluate"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- command line


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Score predicted BraTS segmentations per region.")
    add = parser.add_argument
    conventions = sorted(CONVENTIONS)
    add("--predictions", type=Path, required=True, help="folder of <case_id>.nii[.gz] files")
    add("--references", type=Path, required=True, help="<case_id>.nii[.gz] or case folders")
    add("--output", type=Path, default=Path("metrics.csv"), help="per-case CSV (./metrics.csv)")
    add(
        "--labels",
        choices=conventions,
        help="references' label convention (default: from the layout, else brats2020)",
    )
    add("--pred-labels", choices=conventions, help="predictions' (default: the reference's)")
    add("--hd95", choices=HD95_CONVENTIONS, default="pooled", help="HD95 convention (pooled)")
    add(
        "--nsd-tolerance",
        type=float,
        metavar="MM",
        help="NSD tolerance in mm (default: smallest spacing per lesion, half of it globally)",
    )
    add("--allow-missing", action="store_true", help="skip unpaired or mismatched cases")
    add("--mlflow-run", metavar="ID", help="log means and files to this MLflow run")
    add("--tracking-uri", metavar="URI", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI)")
    add("--overlays", type=Path, metavar="DIR", help="three-view overlay PNG per case here")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, folder in (("--predictions", args.predictions), ("--references", args.references)):
        if not folder.is_dir():
            raise ArgError(f"{folder}: not a folder ({flag})")
    if args.output.is_dir():
        raise ArgError(f"{args.output}: a folder, not a file (--output)")
    if args.nsd_tolerance is not None and not args.nsd_tolerance >= 0:
        raise ArgError(f"--nsd-tolerance {args.nsd_tolerance} must be >= 0 (mm)")
    if args.overlays is not None and args.overlays.exists() and not args.overlays.is_dir():
        raise ArgError(f"{args.overlays}: not a folder (--overlays)")


def error(message: str) -> None:
    console.error(PROG, message)


def select_pairs(args: argparse.Namespace) -> tuple[list[Pair], dict[str, str]]:
    """Pairs to score and skipped cases; DataError when nothing can be scored."""
    pairs, problems = paired_cases(args.predictions, args.references)
    if problems and not args.allow_missing:
        for cid, why in sorted(problems.items()):
            error(f"case {cid}: {why}")
        raise DataError(
            f"{len(problems)} case(s) unpaired or mismatched; nothing written "
            "(--allow-missing skips them)"
        )
    for cid, why in sorted(problems.items()):
        log.warning("skipping case %s: %s", cid, why)
    if not pairs:
        raise DataError(f"no cases to score in {args.predictions} and {args.references}")
    return pairs, problems


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args

    # imported here: tumorseg.tracking.client imports Lightning, slow and not needed otherwise
    from tumorseg.tracking.client import tracking_uri

    paths = output_paths(args.output)
    uri = tracking_uri(args.tracking_uri)
    try:
        client = run_client(args.mlflow_run, uri) if args.mlflow_run else None
        pairs, skipped = select_pairs(args)
        df, lesions = score_all(
            pairs,
            args.pred_labels,
            args.labels,
            not args.quiet,
            args.hd95,
            args.nsd_tolerance,
        )
        summary = summarise(df)
        overlays = []
        if args.overlays:
            overlays = overlay_writers(pairs, args.overlays, args.pred_labels, args.labels)
        write_outputs(df, summary, paths, lesions, overlays)
    except DataError as err:
        error(str(err))
        return 2
    except OSError as err:
        error(f"cannot write {args.output}: {err}")
        return 1

    print(f"{len(pairs)} cases, means:")
    print(means_table(summary))
    if skipped:
        print(f"skipped {len(skipped)} case(s): " + ", ".join(sorted(skipped)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.overlays and overlays:
        print(f"wrote {len(overlays)} overlay(s) to {args.overlays}")
    elif args.overlays:
        log.warning("no overlays: no reference belongs to a BraTS or MSD case with its images")

    if client is not None:
        try:
            log_to_mlflow(client, args.mlflow_run, summary, paths, args.hd95)
        except Exception as err:  # network or store failures: the files are already written
            error(f"cannot log to MLflow run {args.mlflow_run} at {uri}: {err}")
            return 1
        print(f"logged to MLflow run {args.mlflow_run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
