"""Register a trained model in the MLflow model registry: ``tumorseg-register``.

``tumorseg-register --run RUN_ID --name NAME [--alias champion]`` registers the run's logged
model (``runs:/<run_id>/model``) as a new version of ``NAME`` and points the alias at it.
``--study RUN_ID`` takes the parent run of an Optuna study instead and registers its best
trial's run (the parent's ``best_trial`` tag); ``--trial N`` registers trial N's run instead,
and must be given where a study of several objectives has more than one best trial. The store
is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the project's local store. Bad input: one
line, exit 2.
"""

from __future__ import annotations

import argparse

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.errors import DataError

PROG = "tumorseg-register"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Register a run's model in the MLflow registry.")
    add = parser.add_argument
    add("--run", metavar="RUN_ID", help="a training run with a logged model")
    add("--study", metavar="RUN_ID", help="a study's parent run: register its best trial")
    add("--trial", type=int, metavar="N", help="with --study: register trial N's run")
    add("--name", required=True, help="registered model name")
    add("--alias", default="champion", help="alias of the new version (default champion)")
    add("--tracking-uri", metavar="URI", help="MLflow store (default: the project's)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if (args.run is None) == (args.study is None):
        raise ArgError("give one of --run or --study")
    if args.trial is not None and args.study is None:
        raise ArgError("--trial goes with --study")


def main(argv: list[str] | None = None) -> int:
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    from tumorseg.tracking.client import default_tracking_uri
    from tumorseg.tracking.registry import register_run, study_best_run

    uri = args.tracking_uri or default_tracking_uri()
    try:
        run_id = args.run or study_best_run(args.study, uri, args.trial)
        version = register_run(run_id, args.name, uri, args.alias or None)
    except DataError as err:
        console.error(PROG, str(err))
        return 2
    uri = f"models:/{args.name}" + (f"@{args.alias}" if args.alias else f"/{version.version}")
    print(f"registered run {run_id} as {args.name} version {version.version}: {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
