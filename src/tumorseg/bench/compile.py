"""What ``model.compile`` costs and gains on this machine: the default U-Net's training step
(bf16 autocast + channels-last where the CPU has native bf16, batch 16, 128x128, BCE + soft Dice,
AdamW) eager and under ``torch.compile``, interleaved in one run.

``python -m tumorseg.bench.compile [--steps 60]`` prints the compile time (TorchDynamo's own
count for the training graph and the eval-mode graph), the median step times (eager and compiled
steps alternate), the gain per step and the break-even point in steps: the number
``tumorseg.training.module.COMPILE_MIN_STEPS_CPU`` is derived from.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from tumorseg.models import UNet
from tumorseg.training.losses import RegionLoss
from tumorseg.training.precision import cpu_has_bf16

FEATURES = [16, 32, 64, 128]  # conf/model/unet.yaml


def make_step(net: torch.nn.Module, batch: int, size: int, bf16: bool):
    """A training step (forward, loss, backward, AdamW) on one fixed synthetic batch."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 4, size, size, generator=gen)
    regions = torch.rand(batch, 3, size, size, generator=gen) > 0.8
    if bf16:
        image = image.contiguous(memory_format=torch.channels_last)
    loss_fn = RegionLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        loss = loss_fn(logits.float(), regions)
        loss.backward()
        opt.step()
        return loss.item()

    def evaluate() -> None:
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(image)
        net.train()

    return step, evaluate


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tumorseg-bench compile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each (60)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    from tumorseg.core.timing import compile_seconds

    bf16 = cpu_has_bf16()
    torch.manual_seed(0)
    eager = UNet(4, 3, FEATURES)
    if bf16:
        eager.to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    eager_step, eager_eval = make_step(eager, args.batch, args.size, bf16)
    eager_first = timed(eager_step) + timed(eager_eval)  # eager warm-up (oneDNN primitives)
    eager_warm = timed(eager_step) + timed(eager_eval)
    compiled.compile()
    comp_step, comp_eval = make_step(compiled, args.batch, args.size, bf16)
    first_train = timed(comp_step)
    first_eval = timed(comp_eval)
    compile_s = compile_seconds()  # TorchDynamo's count: tracing, inductor, C++ builds
    timed(comp_step)
    # step by step in turn, so that load from other processes slows both alike
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        for name, fn in (("eager", eager_step), ("compiled", comp_step)):
            times[name].append(cpu_timed(fn))
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    gain = wall["eager"] - wall["compiled"]
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16: {bf16}")
    print(f"batch {args.batch}, {args.size}x{args.size}, U-Net {FEATURES}, 1-min load {load:.1f}")
    print(f"eager first step + eval {eager_first:.2f} s, warm {eager_warm:.2f} s")
    print(f"compiled first step {first_train:.2f} s, first eval forward {first_eval:.2f} s")
    print(f"compile time (TorchDynamo's count, train + eval graphs): {compile_s:.1f} s")
    print(
        f"median step over {args.steps} steps each, alternating: eager "
        f"{wall['eager'] * 1000:.0f} ms wall ({cpu['eager'] * 1000:.0f} ms CPU), compiled "
        f"{wall['compiled'] * 1000:.0f} ms wall ({cpu['compiled'] * 1000:.0f} ms CPU)"
    )
    if gain > 0:
        print(f"gain {gain * 1000:.1f} ms/step; break-even after {compile_s / gain:.0f} steps")
    else:
        print(f"no gain ({gain * 1000:.1f} ms/step): compiling never pays off here")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
