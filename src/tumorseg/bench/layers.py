"""Where a training step's time goes, layer by layer: ``tumorseg-bench layers``.

Profiles training steps (forward, BCE + soft Dice loss, backward, AdamW step) of a U-Net
variant on a synthetic batch with ``torch.profiler``, in the mode training uses on this CPU
(bf16 autocast + channels-last where the CPU has native bf16, fp32 otherwise; ``--mode``
overrides it). Each convolution's forward and backward are given to its layer by the shapes of
its input and weight; everything else is summed per operator (normalisation, activation,
pooling, concatenation, loss, optimiser). Prints a Markdown table: milliseconds per step
forward and backward, the share of the step, and the layer's GFLOP/s against the matmul peak
of the same dtype measured in the same run; the CPU's bf16 hardware (AMX, AVX-512 BF16 or
none) is named in the header.

``tumorseg-bench layers [--variant unet] [--size 128] [--batch-size 16] [--steps 5]``
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from tumorseg.bench.training import (
    VARIANTS,
    cpu_name,
    make_batch,
    make_net,
    matmul_peak,
    num,
    timed_calls,
)
from tumorseg.core import console
from tumorseg.training.losses import RegionLoss
from tumorseg.training.precision import cpu_bf16_hardware

PROG = "tumorseg-bench layers"
CONV_FORWARD = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::_convolution")
CONV_BACKWARD = ("aten::convolution_backward",)
MATMUL_SIZE = 2048


def conv_layers(net: nn.Module, image: torch.Tensor) -> dict[tuple, tuple[str, float]]:
    """``(input shape, weight shape) -> (layer name, forward FLOPs)`` of every convolution.
    Layers of the same shapes cannot be told apart in the profile: they share one entry, named
    ``a + b``, with their FLOPs summed."""
    found: dict[tuple, tuple[str, float]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x, w = args[0], module.weight
            key = (tuple(x.shape), tuple(w.shape))
            # per output pixel, each output channel sums C_in / groups x k x k products
            flops = 2 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3]
            if isinstance(module, nn.ConvTranspose2d):  # each input pixel feeds k x k outputs
                flops = 2 * x.numel() * w.shape[1] * w.shape[2] * w.shape[3]
            if key in found:
                seen, total = found[key]
                found[key] = (f"{seen} + {name}", total + flops)
            else:
                found[key] = (name, float(flops))

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        net(image)
    for h in handles:
        h.remove()
    return found


def profile_step(variant: str, size: int, batch: int, steps: int, bf16: bool) -> dict:
    """Per-layer forward/backward seconds per step and per-operator seconds of the rest."""
    net = make_net(variant, [16, 32, 64, 128])
    image, regions = make_batch(batch, size)
    layers = conv_layers(net, image)
    if bf16:
        net.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    loss_fn, opt = RegionLoss(), torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        loss_fn(logits.float(), regions).backward()
        opt.step()

    step_s = sorted(timed_calls(step, 2, steps))[steps // 2]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    fwd, bwd, other = defaultdict(float), defaultdict(float), defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6 / steps
        shapes = [tuple(s) for s in event.input_shapes]
        if event.key in CONV_FORWARD and len(shapes) > 1:
            name = layers.get((shapes[0], shapes[1]), ("?", 0.0))[0]
            fwd[name] += seconds
        elif event.key in CONV_BACKWARD and len(shapes) > 2:
            # (grad_output, input, weight)
            name = layers.get((shapes[1], shapes[2]), ("?", 0.0))[0]
            bwd[name] += seconds
        else:
            other[event.key] += seconds
    flops = {name: f for name, f in layers.values()}
    return {"step": step_s, "fwd": fwd, "bwd": bwd, "other": other, "flops": flops}


def report(result: dict, peak: float, mode: str, variant: str, size: int, batch: int) -> str:
    step = result["step"]
    lines = [
        f"Training step of `{variant}` (features 16,32,64,128), "
        f"batch {batch} x 4 x {size} x {size}, {mode}: {step * 1000:.1f} ms per step (median), "
        f"{batch / step:.0f} slices/s",
        "",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_name()}; "
        f"bf16 hardware: {cpu_bf16_hardware() or 'none'}",
        f"- {mode.split('+')[0]} matmul peak ({MATMUL_SIZE}x{MATMUL_SIZE}) in this run: "
        f"{peak:.0f} GFLOP/s",
        "",
        "| layer | forward ms | backward ms | share of step | GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|",
    ]
    names = sorted(
        set(result["fwd"]) | set(result["bwd"]), key=lambda n: -result["fwd"][n] - result["bwd"][n]
    )
    for name in names:
        f, b = result["fwd"][name], result["bwd"][name]
        work = 3 * result["flops"].get(name, 0.0)  # forward, and twice that backward
        rate = work / (f + b) / 1e9 if f + b > 0 else 0.0
        lines.append(
            f"| {name} | {f * 1000:.1f} | {b * 1000:.1f} | {100 * (f + b) / step:.1f} % "
            f"| {num(rate)} | {num(100 * rate / peak)} % |"  # a slow small layer: never 0
        )
    convs = sum(result["fwd"].values()) + sum(result["bwd"].values())
    lines += [
        "",
        f"Convolutions: {convs * 1000:.1f} ms ({100 * convs / step:.0f} % of the step). "
        "The rest, by operator (ms per step):",
        "",
    ]
    rest = sorted(result["other"].items(), key=lambda kv: -kv[1])
    lines += [f"- `{op}`: {s * 1000:.1f}" for op, s in rest[:12] if s * 1000 >= 0.5]
    return "\n".join(lines) + "\n"


def build_parser() -> console.Parser:
    parser = console.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--variant", choices=sorted(VARIANTS), default="unet", help="default unet")
    add("--size", type=console.count(16), default=128, help="input H=W (default 128)")
    add("--batch-size", type=console.count(1), default=16, help="slices per step (default 16)")
    add("--steps", type=console.count(1), default=5, help="profiled steps (default 5)")
    add("--mode", choices=("auto", "fp32", "bf16+cl"), default="auto", help="default auto")
    add("--output", type=Path, help="also write the Markdown table here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = console.start(PROG, lambda: build_parser().parse_args(argv))
    if isinstance(args, int):
        return args
    if args.size % 8:
        console.error(PROG, f"--size must be a multiple of 8, got {args.size}")
        return 2
    mode = args.mode if args.mode != "auto" else ("bf16+cl" if cpu_bf16_hardware() else "fp32")
    bf16 = mode == "bf16+cl"
    peak = matmul_peak(MATMUL_SIZE, torch.bfloat16 if bf16 else torch.float32)
    result = profile_step(args.variant, args.size, args.batch_size, args.steps, bf16)
    text = report(result, peak, mode, args.variant, args.size, args.batch_size)
    print(text, end="")
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
