"""ONNX Runtime against torch on this machine, in one run: one demo case (240x240x155) through
``predict_case`` with the net in torch fp32, torch bf16 autocast (channels-last; the default of
``tumorseg-predict`` on CPUs with native bf16) and onnxruntime fp32 (``tumorseg-predict
--onnx``), the same preprocessing replay for all three; prints a Markdown table.

``python -m tumorseg.bench.export [--checkpoint CKPT] [--repeats N] [--batch-size B]``
(without a checkpoint: the default training config's net, random weights).
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from tumorseg.bench.inference import best_times, default_module, demo_case, describe
from tumorseg.core import console
from tumorseg.core.console import Parser
from tumorseg.core.errors import DataError
from tumorseg.inference.export import OnnxRunner, export
from tumorseg.inference.predict import load_for_inference, predict_case

PROG = "tumorseg-bench export"


def bench(checkpoint: Path | None, repeats: int, batch_size: int) -> str:
    """Markdown report: seconds per case for torch fp32, torch bf16 and onnxruntime fp32."""
    import onnxruntime

    load_start = os.getloadavg()[0]
    cpu = torch.device("cpu")
    module = load_for_inference(checkpoint, cpu) if checkpoint else default_module(cpu)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "net.onnx"
        export(copy.deepcopy(module), "onnx", onnx_file, checkpoint)
        runner = OnnxRunner(onnx_file, threads=torch.get_num_threads())
        case, _ = demo_case(Path(tmp) / "case")
        fp32 = functools.partial(predict_case, module, case, batch_size=batch_size, autocast=False)
        bf16 = functools.partial(predict_case, module, case, batch_size=batch_size)
        ort = functools.partial(predict_case, runner, case, batch_size=batch_size)
        agree = float((ort() == fp32()).mean())
        seconds = best_times([fp32, bf16, ort], repeats)
    rows = [
        ("torch (tumorseg-predict --checkpoint, autocast off)", "fp32"),
        ("torch (tumorseg-predict --checkpoint)", "bf16 autocast + channels-last"),
        (f"onnxruntime {onnxruntime.__version__} (tumorseg-predict --onnx)", "fp32"),
    ]
    lines = [
        *describe(module, cpu, case),
        f"- onnxruntime CPU provider, {torch.get_num_threads()} intra-op threads; best of "
        f"{repeats} interleaved rounds after a warm-up; preprocessing and mapping back included",
        f"- onnxruntime labels equal torch fp32 labels on {agree:.4%} of voxels",
        f"- 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        "the end (other processes on these cores slow every row)",
        "",
        "| runtime | precision | s / case | vs torch bf16 |",
        "|---|---|---:|---:|",
    ]
    for (name, precision), sec in zip(rows, seconds, strict=True):
        lines.append(f"| {name} | {precision} | {sec:.2f} | {seconds[1] / sec:.2f}x |")
    fastest = rows[int(np.argmin(seconds))][0]
    lines += ["", f"Fastest here: {fastest}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description="onnxruntime against torch fp32 and bf16 on one case")
    parser.add_argument("--checkpoint", type=Path, metavar="CKPT")
    parser.add_argument("--repeats", type=console.count(1), default=3, metavar="N")
    parser.add_argument("--batch-size", type=console.count(1), default=32, metavar="B")
    args = console.start(PROG, lambda: parser.parse_args(argv))
    if isinstance(args, int):
        return args
    try:
        print(bench(args.checkpoint, args.repeats, args.batch_size))
    except DataError as err:
        console.error(PROG, str(err))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
