"""``tumorseg-report``: compare model variants from their MLflow runs (see
``tumorseg.report.compare`` for what is read and written), or a study's best trial with its
baseline on the test patients (``tumorseg.report.study``)::

    tumorseg-report --experiment variant_comparison --output experiments/variant_comparison
    tumorseg-report --study tumorseg-unet [--storage sqlite:///mlruns/optuna.db] [--trial N]
    tumorseg-report --study tumorseg-unet --held-out DIR   # on patients no trial saw
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.errors import DataError, first_line
from tumorseg.report.compare import build_report, log_report, write_files
from tumorseg.report.runs import open_client

PROG = "tumorseg-report"
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"  # conf/hparams_search's, from the project root


# ---------------------------------------------------------------- command line


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Compare model variants from their MLflow runs (--experiment), or a "
        "study's best trial with its baseline trial 0 on the test patients (--study).",
    )
    add = parser.add_argument
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="MLflow experiment name")
    which.add_argument("--study", help="Optuna study name (hparams_search's study_name)")
    add(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"the study's Optuna storage URL (default {DEFAULT_STORAGE})",
    )
    add("--trial", type=int, help="with --study: compare this trial, not the best")
    add(
        "--held-out",
        type=Path,
        metavar="DIR",
        help="with --study: labelled case folders no trial saw; each completed trial's "
        "checkpoint predicts them, in place of the test stage's patients",
    )
    add("--device", default="auto", help="with --held-out: auto (default), cpu or cuda")
    add("--output", type=Path, help="output folder (default reports/<experiment or study>)")
    add("--tracking-uri", metavar="URI", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI)")
    add("--filter", metavar="EXPR", help="extra MLflow run filter, e.g. \"tags.sweep = '...'\"")
    add("--metric-prefix", default="test", help="metrics <prefix>/dice_wt ... (default test)")
    add("--holm", action="store_true", help="add Holm-adjusted p-values to the paired tests")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.trial is not None and not args.study:
        raise ArgError("--trial needs --study")
    if args.held_out is not None and not args.study:
        raise ArgError("--held-out needs --study")
    if args.held_out is not None and not args.held_out.is_dir():
        raise ArgError(f"--held-out {args.held_out}: no such folder")
    if args.output is None:
        args.output = Path("reports") / (args.study or args.experiment)
    if args.output.exists() and not args.output.is_dir():
        raise ArgError(f"--output {args.output} is not a folder")
    if not args.metric_prefix.strip("/"):
        raise ArgError("--metric-prefix is empty")
    args.metric_prefix = args.metric_prefix.strip("/")
    return args


def error(message: str) -> None:
    console.error(PROG, message)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = console.start(PROG, lambda: parse_args(argv))
    if isinstance(args, int):
        return args
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    # imported here: tumorseg.tracking.client imports Lightning, slow and not needed otherwise
    from tumorseg.tracking.client import tracking_uri

    uri = tracking_uri(args.tracking_uri)
    if args.study:
        return study_main(args, uri)
    try:
        client = open_client(uri)
        experiment_id, writers, context = build_report(
            client, args.experiment, args.filter, args.metric_prefix, args.holm
        )
    except DataError as err:
        error(str(err))
        return 2

    try:
        paths = write_files(args.output, writers)
    except OSError as err:
        error(f"cannot write {args.output}: {err}")
        return 1
    print(f"{context['n_runs']} runs; wrote " + ", ".join(str(p) for p in paths))
    print((args.output / "summary.md").read_text().split("\n## Runs")[0].rstrip())

    try:
        run_id = log_report(client, experiment_id, paths, context)
    except Exception as err:  # store failures: the files are already written
        error(f"cannot log the report to MLflow at {uri}: {first_line(err)}")
        return 1
    print(f"logged to MLflow run {run_id} (name report) in experiment {args.experiment!r}")
    return 0


def study_main(args: argparse.Namespace, uri: str) -> int:
    """``--study``: the best trial against trial 0 on the test patients (or ``--held-out``'s),
    and the rank agreement of the objective with their Dice."""
    from tumorseg.report.study import HeldOut, build_study_report, load_study, log_to_parent
    from tumorseg.report.study import write_study_files as write

    held_out = None
    if args.held_out is not None:
        held_out = HeldOut(args.held_out, uri, args.output / "held_out", args.device)
    try:
        client = open_client(uri)
        study = load_study(args.study, args.storage)
        writers, numbers = build_study_report(client, study, args.trial, held_out)
    except DataError as err:
        error(str(err))
        return 2
    try:
        paths = write(args.output, writers)
    except OSError as err:
        error(f"cannot write {args.output}: {err}")
        return 1
    print("wrote " + ", ".join(str(p) for p in paths))
    text = (args.output / "study.md").read_text()
    print(text.split("\n## Trials")[0].rstrip())
    try:
        run_id = log_to_parent(client, args.study, paths, numbers)
    except Exception as err:  # store failures: the files are already written
        error(f"cannot log the report to MLflow at {uri}: {first_line(err)}")
        return 1
    if run_id:
        where = "report/" if held_out is None else "report/held_out/"
        print(f"logged to the study's parent run {run_id} ({where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
