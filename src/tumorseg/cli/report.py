"""``tumorseg-report``: compare model variants from their MLflow runs (see
``tumorseg.comparison`` for what is read and written)::

    tumorseg-report --experiment variant_comparison --output experiments/variant_comparison
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tumorseg import cli
from tumorseg.cli import ArgError, Parser
from tumorseg.comparison import build_report, log_report, open_client, write_files
from tumorseg.errors import DataError, first_line

PROG = "tumorseg-report"


# ---------------------------------------------------------------- command line


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Compare model variants from their MLflow runs.")
    add = parser.add_argument
    add("--experiment", required=True, help="MLflow experiment name")
    add("--output", type=Path, help="output folder (default reports/<experiment>)")
    add("--tracking-uri", metavar="URI", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI)")
    add("--filter", metavar="EXPR", help="extra MLflow run filter, e.g. \"tags.sweep = '...'\"")
    add("--metric-prefix", default="test", help="metrics <prefix>/dice_wt ... (default test)")
    add("--holm", action="store_true", help="add Holm-adjusted p-values to the paired tests")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.output is None:
        args.output = Path("reports") / args.experiment
    if args.output.exists() and not args.output.is_dir():
        raise ArgError(f"--output {args.output} is not a folder")
    if not args.metric_prefix.strip("/"):
        raise ArgError("--metric-prefix is empty")
    args.metric_prefix = args.metric_prefix.strip("/")
    return args


def error(message: str) -> None:
    cli.error(PROG, message)


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = cli.start(PROG, lambda: parse_args(argv))
    if isinstance(args, int):
        return args
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    # imported here: tumorseg.tracking imports Lightning, slow and not needed otherwise
    from tumorseg.tracking import tracking_uri

    uri = tracking_uri(args.tracking_uri)
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


if __name__ == "__main__":
    raise SystemExit(main())
