"""``tumorseg-bench <what> [options]``: every benchmark behind one command, each measured
against its baseline in the same run (``tumorseg-bench <what> --help`` for its options).

The old names still work for one release: ``tumorseg-bench`` with options and no ``<what>``
runs ``training``, ``tumorseg-bench-data`` runs ``data`` and ``tumorseg-predict --benchmark``
runs ``inference``; each says so in one line.
"""

from __future__ import annotations

import importlib
import sys

PROG = "tumorseg-bench"
# what -> (module under tumorseg.bench, one line for the list)
BENCHMARKS = {
    "training": ("training", "training step of the U-Net variants, fp32 vs bf16 + channels-last"),
    "layers": ("layers", "where a training step's time goes, layer by layer (profiler)"),
    "compile": ("compile", "eager vs torch.compile training step, and the compile time"),
    "data": ("data", "slices/s from the packed store vs per-file Kaggle h5"),
    "inference": ("inference", "seconds per case: naive loop, batched, batched + TTA"),
    "startup": ("startup", "tumorseg-predict as users wait: start-up, one case, a folder"),
    "pipeline": ("pipeline", "a folder through tumorseg-predict vs one case after another"),
    "scoring": ("scoring", "case scoring inside bounding boxes vs the whole volume"),
    "export": ("export", "ONNX Runtime vs PyTorch on one case"),
}


def usage() -> str:
    lines = [f"usage: {PROG} <what> [options]   ({PROG} <what> --help)", "", "what:"]
    lines += [f"  {name:<10} {line}" for name, (_, line) in BENCHMARKS.items()]
    return "\n".join(lines)


def run(what: str, argv: list[str]) -> int:
    module = importlib.import_module(f"tumorseg.bench.{BENCHMARKS[what][0]}")
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    what, rest = argv[0], argv[1:]
    if what.startswith("-"):  # the old tumorseg-bench: the training benchmark
        print(f"{PROG}: note: write '{PROG} training {' '.join(argv)}'", file=sys.stderr)
        return run("training", argv)
    if what not in BENCHMARKS:
        print(
            f"{PROG}: error: unknown benchmark {what!r}; choose from {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    return run(what, rest)


def data_alias() -> int:
    """``tumorseg-bench-data``, the old name of ``tumorseg-bench data``."""
    print(f"{PROG}-data: note: write '{PROG} data'", file=sys.stderr)
    return run("data", sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
