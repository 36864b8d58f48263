"""Export a trained net for serving: ``tumorseg-export``.

``tumorseg-export --checkpoint CKPT | --run RUN_ID | --model URI --format onnx|torchscript
--output FILE`` writes the net with its input size, preprocessing and label convention in the
file's metadata (``tumorseg.inference.export``). ``--run`` takes the run's kept checkpoint from its
``checkpoints/`` artifacts; ``--model`` an MLflow model (``runs:/<run_id>/model``,
``models:/<name>@<alias>``); both from ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
the project's local store. Bad input prints one line and exits 2; nothing is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.errors import DataError

PROG = "tumorseg-export"
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}


def add_source(parser: Parser) -> None:
    """``--checkpoint``, ``--run``, ``--model``, ``--tracking-uri`` and ``--trust-checkpoint``."""
    add = parser.add_argument
    add("--checkpoint", type=Path, metavar="CKPT", help="trained .ckpt (stores its config)")
    add("--run", metavar="RUN_ID", help="an MLflow run: the checkpoint it kept")
    add("--model", metavar="URI", help="an MLflow model: runs:/<id>/model, models:/<name>@<alias>")
    add("--tracking-uri", metavar="URI", help="MLflow store (default: the project's)")
    add("--trust-checkpoint", action="store_true", help="load objects other than plain data")


def sources(args: argparse.Namespace) -> list[str]:
    given = {"--checkpoint": args.checkpoint, "--run": args.run, "--model": args.model}
    return [flag for flag, value in given.items() if value is not None]


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Export a trained net as ONNX or TorchScript, with its preprocessing.",
        epilog="Bad input exits 2 and writes nothing.",
    )
    add_source(parser)
    parser.add_argument("--format", choices=sorted(SUFFIXES), default="onnx", help="default onnx")
    parser.add_argument("--output", type=Path, metavar="FILE", required=True)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if len(sources(args)) != 1:
        raise ArgError("give one of --checkpoint, --run or --model")
    if not args.output.name.endswith(SUFFIXES[args.format]):
        raise ArgError(
            f"--output {args.output}: a {args.format} file name ends in "
            + " or ".join(SUFFIXES[args.format])
        )


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0, 2 for bad input (nothing written) or 1 if writing fails."""
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    from tumorseg.inference.export import export
    from tumorseg.inference.predict import load_for_inference
    from tumorseg.tracking.client import default_tracking_uri

    try:
        if args.checkpoint is not None:
            module = load_for_inference(args.checkpoint, "cpu", args.trust_checkpoint)
        else:
            from tumorseg.tracking.registry import resolve_checkpoint, temp_dir

            uri = args.tracking_uri or default_tracking_uri()
            with temp_dir() as tmp:
                ckpt = resolve_checkpoint(None, args.run, args.model, uri, Path(tmp))
                module = load_for_inference(ckpt, "cpu", args.trust_checkpoint)
        export(module, args.format, args.output, args.checkpoint or args.run or args.model)
    except DataError as err:
        console.error(PROG, str(err))
        return 2
    except OSError as err:
        console.error(PROG, f"cannot write: {err}")
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
