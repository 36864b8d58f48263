"""``tumorseg-prepare``: convert a BraTS source (Kaggle h5, BraTS NIfTI, MSD) into a packed
slice store (``tumorseg.data.prepare``)::

    tumorseg-prepare --input /data/BraTS2020_training_data --output data/stores/kaggle --workers 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.core.errors import DataError
from tumorseg.core.labels import MASK_ORDER, check_mask_order
from tumorseg.data.case import MODALITIES
from tumorseg.data.prepare import check_options, prepare
from tumorseg.data.store import DTYPES, is_complete

PROG = "tumorseg-prepare"


# ---------------------------------------------------------------- command line


def channel_list(text: str) -> tuple[str, ...]:
    """``"t1,t1ce,t2,flair"`` -> a tuple naming each modality once."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if sorted(names) != sorted(MODALITIES):
        raise argparse.ArgumentTypeError(
            f"must name each of {','.join(MODALITIES)} once, got {text!r}"
        )
    return names


def mask_list(text: str) -> tuple[str, ...]:
    """``"et,ed,ncr"`` -> a tuple naming each mask label once."""
    try:
        return check_mask_order(text.split(","), "--mask-order")
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Convert a BraTS data set into a packed slice store.")
    add = parser.add_argument
    add("--input", required=True, type=Path, help="data set folder (Kaggle h5, BraTS, MSD)")
    add("--output", required=True, type=Path, help="store folder to create")
    add("--format", default="auto", choices=("auto", "kaggle-h5", "brats", "msd"))
    add("--dtype", default="float16", choices=DTYPES, help="image dtype (default float16)")
    add("--crop", type=int, default=None, help="crop slices to N x N around the brain")
    add("--workers", type=int, default=1, help="worker processes (default 1)")
    add("--skip-bad", action="store_true", help="leave out bad cases instead of failing")
    add("--channel-order", type=channel_list, default=MODALITIES, help="Kaggle image channels")
    add("--mask-order", type=mask_list, default=MASK_ORDER, help="Kaggle mask channels (ncr,ed,et)")
    add("--force", action="store_true", help="rebuild a store that is already complete")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"


def check_args(args: argparse.Namespace) -> None:
    try:
        check_options(args.dtype, args.crop, args.workers)
    except ValueError as err:
        raise ArgError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    """Command line; exit 0 done, 2 bad arguments or bad input, 1 cannot write."""
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args
    logging.getLogger().setLevel(logging.ERROR)
    dst = args.output.absolute()
    if is_complete(dst) and not args.force:
        print(f"{dst}: slice store already complete (use --force to rebuild)")
        return 0
    start = time.perf_counter()
    try:
        manifest = prepare(
            args.input,
            dst,
            args.format,
            args.dtype,
            args.crop,
            args.workers,
            args.skip_bad,
            progress=not args.quiet,
            channel_order=args.channel_order,
            mask_order=args.mask_order,
            force=args.force,
        )
    except DataError as err:
        console.error(PROG, str(err))
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as err:
        console.error(PROG, f"{err.filename or dst}: {err.strerror or err}")
        return 1
    for bad in manifest["skipped"]:
        print(f"skipped {bad['id']}: {bad['reason']}")
    h, w = manifest["shape"]
    print(
        f"{dst}: {len(manifest['cases'])} cases, {manifest['total_slices']} slices "
        f"{h}x{w} {manifest['dtype']}, {len(manifest['skipped'])} skipped, {_size(dst)}, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
