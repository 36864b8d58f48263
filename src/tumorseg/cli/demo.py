"""``tumorseg-demo``: write the synthetic demo data set in the BraTS 2020 layout
(``tumorseg.data.demo``)::

    tumorseg-demo --output data/demo --cases 20 --seed 0 --difficulty brats
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.data.demo import DIFFICULTIES, DemoError, case_complete, case_id, write_demo

PROG = "tumorseg-demo"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Write a synthetic BraTS 2020-style demo data set.")
    add = parser.add_argument
    add("--output", required=True, type=Path, help="folder for the case folders")
    add("--cases", type=int, default=20, help="number of cases (default 20)")
    add("--seed", type=int, default=0, help="random seed (default 0)")
    add(
        "--difficulty",
        choices=DIFFICULTIES,
        default="brats",
        help="brats: realistic gliomas, look-alikes, scanner differences (default); "
        "easy: bright uniform lesions with clean borders",
    )
    add("--workers", type=console.count(1), default=2, help="processes writing cases (default 2)")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.cases < 1:
        raise ArgError(f"--cases must be at least 1, got {args.cases}")
    if args.seed < 0:
        raise ArgError(f"--seed must be non-negative, got {args.seed}")
    if args.output.exists() and not args.output.is_dir():
        raise ArgError(f"--output {args.output} exists and is not a folder")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``tumorseg-demo --output DIR --cases N --seed S``."""
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    start = time.perf_counter()
    done = sum(case_complete(args.output / case_id(i)) for i in range(1, args.cases + 1))
    try:
        folders = write_demo(
            args.output,
            args.cases,
            args.seed,
            not args.quiet,
            difficulty=args.difficulty,
            workers=args.workers,
        )
    except DemoError as err:
        console.error(PROG, str(err))
        return 2
    except OSError as err:
        console.error(PROG, f"cannot write to {args.output}: {err}")
        return 1
    seconds = time.perf_counter() - start
    print(
        f"{len(folders)} BraTS demo cases in {args.output} "
        f"({len(folders) - done} written, {done} kept, {seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
