"""CPU training benchmark: U-Net variants in fp32 and bf16 + channels_last, against matmul peak.

``tumorseg-bench`` first measures this machine's matmul peak (GFLOP/s of a large square
``torch.matmul`` in fp32 and in bf16), then times full training steps (forward, BCE + soft Dice
loss, backward, AdamW step) on synthetic batches for each variant, input size and mode:

* ``fp32``: float32, contiguous tensors;
* ``bf16+cl``: bf16 autocast with the net and inputs in ``torch.channels_last``, logits cast to
  float before the loss (as in training).

Throughput is the batch size over the median step time; achieved GFLOP/s is the FLOPs of one
training step (one fp32 forward + backward, counted with ``FlopCounterMode``, the same count for
both modes) over the median step time. It prints a Markdown table, optionally written to a file::

    tumorseg-bench --sizes 128,240 --steps 4 --output bench.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tumorseg.core import console
from tumorseg.core.console import ArgError, Parser
from tumorseg.models import AttentionUNet, ResidualUNet, UNet
from tumorseg.training.losses import RegionLoss
from tumorseg.training.precision import cpu_bf16_hardware

PROG = "tumorseg-bench training"
VARIANTS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "attention_unet": AttentionUNet,
    "residual_unet": ResidualUNet,
}
MODES = ("fp32", "bf16+cl")
IN_CHANNELS, OUT_CHANNELS = 4, 3
LR, WEIGHT_DECAY = 3e-3, 1e-4  # as in conf/model/*.yaml
MATMUL_WARMUP, MATMUL_REPEATS = 2, 5


@dataclass
class Row:
    """One measured configuration."""

    variant: str
    size: int
    mode: str
    batch: int
    step_s: float  # median seconds per training step
    flops: float  # FLOPs of one training step

    @property
    def slices_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def gflops(self) -> float:
        return self.flops / self.step_s / 1e9


# ---------------------------------------------------------------- arguments


def int_list(text: str) -> list[int]:
    """``"128,240"`` -> ``[128, 240]``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def name_list(text: str) -> list[str]:
    """``"unet,residual_unet"`` -> names, each one of ``VARIANTS``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant {bad[0] if bad else text!r}; choose from {', '.join(VARIANTS)}"
        )
    return names


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="CPU training benchmark of the U-Net variants.")
    add = parser.add_argument
    add("--variants", type=name_list, default=list(VARIANTS), help="comma-separated (default all)")
    add("--sizes", type=int_list, default=[128, 240], help="input H=W list (default 128,240)")
    add("--batch-size", type=int, default=16, help="slices per training step (default 16)")
    add("--steps", type=int, default=8, help="timed steps per configuration (default 8)")
    add("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    add("--features", type=int_list, default=[16, 32, 64, 128], help="default 16,32,64,128")
    add("--matmul-size", type=int, default=2048, help="n of the n x n matmul (default 2048)")
    add("--output", type=Path, default=None, help="also write the Markdown report here")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ArgError`` for values argparse cannot check on its own."""
    multiple = 2 ** (len(args.features) - 1)
    if args.batch_size < 1:
        raise ArgError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.steps < 1:
        raise ArgError(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        raise ArgError(f"--warmup must be non-negative, got {args.warmup}")
    if args.matmul_size < 1:
        raise ArgError(f"--matmul-size must be at least 1, got {args.matmul_size}")
    if len(args.features) < 2 or min(args.features) < 1:
        raise ArgError(f"--features needs at least 2 positive widths, got {args.features}")
    bad = [s for s in args.sizes if s < multiple or s % multiple]
    if bad:
        raise ArgError(f"--sizes must be positive multiples of {multiple}, got {bad[0]}")
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        raise ArgError(f"--output {args.output} is a folder or its folder does not exist")


# ---------------------------------------------------------------- measurements


def timed_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(n: int, dtype: torch.dtype) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype``: 2 n^3 FLOPs over the best repeat."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    seconds = min(timed_calls(lambda: torch.matmul(a, b), MATMUL_WARMUP, MATMUL_REPEATS))
    return 2 * n**3 / seconds / 1e9


def measure_peaks(n: int) -> dict[str, float]:
    """Matmul GFLOP/s keyed by the mode it is the peak for."""
    return {"fp32": matmul_peak(n, torch.float32), "bf16+cl": matmul_peak(n, torch.bfloat16)}


def make_batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic image ``(N, 4, H, W)`` and binary region targets ``(N, 3, H, W)``."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, IN_CHANNELS, size, size, generator=gen)
    regions = torch.rand(batch, OUT_CHANNELS, size, size, generator=gen) > 0.5
    return image, regions


def make_net(variant: str, features: list[int]) -> nn.Module:
    torch.manual_seed(0)
    net = VARIANTS[variant](IN_CHANNELS, OUT_CHANNELS, tuple(features), norm="batch", dropout=0.0)
    return net.train()


def count_flops(
    variant: str, features: list[int], image: torch.Tensor, regions: torch.Tensor
) -> int:
    """FLOPs of one fp32 forward + loss + backward (the optimizer step is not counted)."""
    net, loss_fn = make_net(variant, features), RegionLoss()
    with FlopCounterMode(display=False) as counter:
        loss_fn(net(image), regions).backward()
    return counter.get_total_flops()


def step_times(
    variant: str,
    features: list[int],
    image: torch.Tensor,
    regions: torch.Tensor,
    mode: str,
    warmup: int,
    steps: int,
) -> list[float]:
    """Seconds of each timed training step (forward, loss, backward, AdamW step)."""
    net, loss_fn = make_net(variant, features), RegionLoss()
    bf16 = mode == "bf16+cl"
    if bf16:
        net.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        loss_fn(logits.float(), regions).backward()
        optimizer.step()

    return timed_calls(step, warmup, steps)


def run(args: argparse.Namespace) -> list[Row]:
    """Measure every variant x size x mode; progress goes to stderr."""
    rows = []
    for variant in args.variants:
        for size in args.sizes:
            image, regions = make_batch(args.batch_size, size)
            flops = count_flops(variant, args.features, image, regions)
            for mode in MODES:
                times = step_times(
                    variant, args.features, image, regions, mode, args.warmup, args.steps
                )
                median = statistics.median(times)
                rows.append(Row(variant, size, mode, args.batch_size, median, flops))
                spread = ", ".join(f"{t:.2f}" for t in times)
                print(f"  {variant} {size} {mode}: steps {spread} s", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- report


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_lines(n: int, start: dict[str, float], end: dict[str, float]) -> list[str]:
    hardware = cpu_bf16_hardware()
    bf16 = f"yes, {hardware}" if hardware else "no"
    peak = {mode: f"{max(start[mode], end[mode]):.0f}" for mode in MODES}
    return [
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()} "
        f"(native bf16: {bf16})",
        f"- matmul peak ({n}x{n}, best of {MATMUL_REPEATS} at the start and the end of the run): "
        f"fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16+cl']} GFLOP/s "
        f"(start {start['fp32']:.0f} / {start['bf16+cl']:.0f}, "
        f"end {end['fp32']:.0f} / {end['bf16+cl']:.0f})",
    ]


def num(x: float) -> str:
    """Three significant digits, without exponents for large values."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def table_lines(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    fp32_step = {(r.variant, r.size): r.step_s for r in rows if r.mode == "fp32"}
    lines = [
        "| variant | input | mode | batch | slices/s | GFLOP/s | % of peak | speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = fp32_step.get((r.variant, r.size))
        speedup = f"{base / r.step_s:.2f}x" if r.mode != "fp32" and base else "-"
        percent = 100 * r.gflops / peaks[r.mode]
        lines.append(
            f"| {r.variant} | {IN_CHANNELS}x{r.size}x{r.size} | {r.mode} | {r.batch} "
            f"| {num(r.slices_per_s)} | {num(r.gflops)} | {num(percent)} | {speedup} |"
        )
    return lines


def report(
    args: argparse.Namespace, rows: list[Row], start: dict[str, float], end: dict[str, float]
) -> str:
    features = ",".join(map(str, args.features))
    peaks = {mode: max(start[mode], end[mode]) for mode in MODES}
    return "\n".join(
        [
            "# tumorseg-bench: training throughput on CPU",
            "",
            *environment_lines(args.matmul_size, start, end),
            f"- features {features}; {args.warmup} warm-up + {args.steps} timed steps "
            "(median); GFLOP/s from one fp32 forward + backward; % of the fp32 or bf16 "
            "matmul peak; speed-up = fp32 / bf16+cl step time",
            "",
            *table_lines(rows, peaks),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: ``tumorseg-bench [--variants ...] [--sizes 128,240] [--output FILE]``."""
    args = console.start(PROG, lambda: console.checked(build_parser(), check_args, argv))
    if isinstance(args, int):
        return args

    start = time.perf_counter()
    print(f"{PROG}: matmul peak ...", file=sys.stderr, flush=True)
    start_peaks = measure_peaks(args.matmul_size)
    rows = run(args)
    end_peaks = measure_peaks(args.matmul_size)
    text = report(args, rows, start_peaks, end_peaks)
    print(text)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    if args.output is not None:
        try:
            args.output.write_text(text)
        except OSError as err:
            print(f"{PROG}: error: cannot write {args.output}: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
