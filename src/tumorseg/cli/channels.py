"""``tumorseg-channels``: check which stored image channel holds which MRI modality (see
``tumorseg.data.channels``)::

    tumorseg-channels --input /data/brats2020-training-data --cases 5
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tumorseg.cli import ArgError, Parser
from tumorseg.data.channels import channel_report
from tumorseg.data.nifti import MODALITIES
from tumorseg.data.readers import FORMATS
from tumorseg.errors import DataError
from tumorseg.labels import CONVENTIONS

PROG = "tumorseg-channels"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Mean z-scored intensity per channel and region.")
    add = parser.add_argument
    add("--input", type=Path, required=True, help="data set folder")
    add("--format", choices=("auto", *FORMATS), default="auto", help="source format (auto)")
    add("--cases", type=int, default=5, help="number of cases to look at (default 5)")
    add(
        "--channel-order",
        default=",".join(MODALITIES),
        help="modality of each stored Kaggle channel (default flair,t1,t1ce,t2)",
    )
    add("--labels", choices=sorted(CONVENTIONS), help="label convention (default: the format's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: ``tumorseg-channels --input DIR [--format F] [--cases N] ...``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.cases < 1:
            raise ArgError(f"--cases must be at least 1, got {args.cases}")
        order = tuple(name.strip().lower() for name in args.channel_order.split(","))
        report = channel_report(args.input, args.format, args.cases, order, args.labels)
    except (ArgError, DataError, OSError) as err:
        message = str(err).replace("\n", " ")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
