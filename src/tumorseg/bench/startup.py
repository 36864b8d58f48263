"""``tumorseg-predict`` as a user waits for it, start-up included: ``tumorseg-bench startup``.

Writes the default U-Net with random weights as a checkpoint and ``--cases`` demo cases
(240x240x155) into a temporary folder, then times in interleaved rounds, each in a fresh
process: ``python -c "import torch"`` (the floor every tool pays), ``tumorseg-predict --help``,
one case, and the folder of all cases (whose time over one case's is the cost of each further
case). ``--base-src DIR`` times another source tree (e.g. ``git archive REV src``, unpacked)
next to the installed one in the same rounds, as the baseline.

``tumorseg-bench startup [--cases 4] [--rounds 3] [--base-src DIR]``
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tumorseg.core import console

PROG = "tumorseg-bench startup"


def write_inputs(folder: Path, cases: int) -> tuple[Path, Path]:
    """The default config's net with random weights as a checkpoint, and ``cases`` demo cases."""
    from tumorseg.bench.inference import default_module
    from tumorseg.data.demo import write_demo

    torch.manual_seed(0)
    module = default_module(torch.device("cpu"))
    ckpt = folder / "default.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "tumorseg_config": module.config,
            "tumorseg_preprocessing": module.preprocessing.to_dict(),
        },
        ckpt,
    )
    write_demo(folder / "cases", cases=cases, seed=0, progress=False, workers=2)
    return ckpt, folder / "cases"


def seconds(cmd: list[str], src: Path | None) -> float:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return took


def build_parser() -> console.Parser:
    parser = console.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--cases", type=console.count(2), default=4, help="demo cases in the folder (4)")
    add("--rounds", type=console.count(1), default=3, help="interleaved rounds (3)")
    add("--base-src", type=Path, help="another source tree to time as the baseline")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = console.start(PROG, lambda: build_parser().parse_args(argv))
    if isinstance(args, int):
        return args
    if args.base_src is not None and not (args.base_src / "tumorseg").is_dir():
        console.error(PROG, f"--base-src {args.base_src}: no tumorseg package there")
        return 2
    versions = [("installed", None)]
    if args.base_src is not None:
        versions.insert(0, ("base", args.base_src.resolve()))
    predict = [sys.executable, "-m", "tumorseg.cli.predict"]
    lines = [
        f"`tumorseg-predict`, default U-Net (random weights), {args.cases} demo cases "
        f"240x240x155; torch {torch.__version__}, {os.cpu_count()} CPUs",
        "",
        "| round | version | `import torch` | `--help` | one case | folder | each further case "
        "| 1-min load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, cases = write_inputs(work, args.cases)
        one = sorted(p for p in cases.iterdir() if p.is_dir())[0]
        for r in range(1, args.rounds + 1):
            for name, src in versions:
                model = ["--checkpoint", str(ckpt), "--quiet"]
                floor = seconds([sys.executable, "-c", "import torch"], src)
                helps = seconds([*predict, "--help"], src)
                single = seconds(
                    [
                        *predict,
                        *model,
                        "--input",
                        str(one),
                        "--output",
                        str(work / f"{name}{r}.nii.gz"),
                    ],
                    src,
                )
                folder = seconds(
                    [*predict, *model, "--input", str(cases), "--output", str(work / f"{name}{r}")],
                    src,
                )
                further = (folder - single) / (args.cases - 1)
                load = os.getloadavg()[0]
                lines.append(
                    f"| {r} | {name} | {floor:.2f} s | {helps:.2f} s | {single:.2f} s "
                    f"| {folder:.2f} s | {further:.2f} s | {load:.1f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
