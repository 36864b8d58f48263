"""``tumorseg-channels``: check which stored image channel holds which MRI modality and, for
Kaggle copies, which one-hot mask channel holds which tumour label (``tumorseg.data.channels``)::

    tumorseg-channels --input /data/brats2020-training-data --cases 5
"""

from __future__ import annotations

from pathlib import Path

from tumorseg.core import console
from tumorseg.core.console import Parser
from tumorseg.core.errors import DataError
from tumorseg.core.labels import CONVENTIONS, MASK_ORDER
from tumorseg.data.case import MODALITIES
from tumorseg.data.channels import channel_report
from tumorseg.data.readers import FORMATS

PROG = "tumorseg-channels"


def names(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG, description="Mean z-scored intensity per channel and region; mask channels."
    )
    add = parser.add_argument
    add("--input", type=Path, required=True, help="data set folder")
    add("--format", choices=("auto", *FORMATS), default="auto", help="source format (auto)")
    add("--cases", type=console.count(1), default=5, help="number of cases to look at (default 5)")
    add(
        "--channel-order",
        type=names,
        default=MODALITIES,
        help="modality of each stored Kaggle channel (default flair,t1,t1ce,t2)",
    )
    add(
        "--mask-order",
        type=names,
        default=MASK_ORDER,
        help="label of each Kaggle one-hot mask channel (default ncr,ed,et)",
    )
    add("--labels", choices=sorted(CONVENTIONS), help="label convention (default: the format's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: ``tumorseg-channels --input DIR [--format F] [--cases N] ...``."""
    args = console.start(PROG, lambda: build_parser().parse_args(argv))
    if isinstance(args, int):
        return args
    try:
        report = channel_report(
            args.input, args.format, args.cases, args.channel_order, args.labels, args.mask_order
        )
    except (DataError, OSError) as err:
        console.error(PROG, str(err).replace("\n", " "))
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
