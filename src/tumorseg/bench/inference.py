"""Inference speed: one 240x240x155 case through the batched path (with and without TTA)
next to a naive one-slice-at-a-time fp32 loop, in one run (``tumorseg-predict --benchmark``)."""

from __future__ import annotations

import copy
import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from tumorseg.bench.training import cpu_name
from tumorseg.core.labels import target
from tumorseg.data.case import Case
from tumorseg.data.preprocess import NetInput, from_net, net_shape, to_net
from tumorseg.data.readers import list_cases
from tumorseg.inference.predict import (
    autocast_dtype,
    load_for_inference,
    pick_device,
    predict_case,
    segmentation_image,
    size_step,
)
from tumorseg.training.module import SegModule
from tumorseg.training.precision import cpu_has_bf16


def predict_case_naive(module: SegModule, net: torch.nn.Module, case: Case) -> np.ndarray:
    """Baseline for the benchmark: the same slices, each alone through ``net``, fp32, no TTA."""
    replay = NetInput.of(case.image, case.affine, module.preprocessing, case.case_id)
    goal = target(module.hparams.target)
    shape = replay.slice_shape
    padded, size = net_shape(shape, module.preprocessing, size_step(module))
    labels = np.zeros(replay.oriented, dtype=np.uint8)
    fill = goal.background()
    with torch.inference_mode():
        for x, z in zip(replay.image, replay.keep, strict=True):
            logits = from_net(net(to_net(x[None], padded, size)), padded, shape)
            probs = replay.back(goal.activate(logits), fill)
            labels[:, :, z] = goal.decide(probs)[0].numpy()
    return replay.undo(labels)


def default_module(device: torch.device) -> SegModule:
    """Module of the default training config (U-Net 16-32-64-128, 128x128), random weights."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tumorseg.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train")
    module: SegModule = instantiate(cfg.model)
    module.config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=False),
    }
    module.to(device).eval()
    if autocast_dtype(device) is not None:
        module.net.to(memory_format=torch.channels_last)
    return module


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best seconds of each call over ``repeats`` rounds, after one warm-up call each.

    Each round calls every function once, in turn, so that load from other processes on a
    shared machine slows them alike; the best time is the least disturbed one.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def demo_case(folder: Path) -> tuple[Case, Path]:
    """One generated demo case (240x240x155) and its folder."""
    from tumorseg.data.demo import write_demo

    write_demo(folder, cases=1, seed=0, progress=False)
    ref = list_cases(folder, labelled=False)[0]
    return ref.load(), ref.paths[0].parent


def describe(module: SegModule, device: torch.device, case: Case) -> list[str]:
    """Benchmark header: software, hardware, model and case."""
    features = ",".join(str(f) for f in module.config["model"]["net"].get("features", []))
    shape = case.image.shape[1:]
    kept = len(NetInput.of(case.image, case.affine, module.preprocessing, case.case_id).keep)
    return [
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, device {device} "
        f"({cpu_name()}; native bf16: {'yes' if cpu_has_bf16() else 'no'})",
        f"- model {module.hparams.name} features {features}, target {module.hparams.target}; "
        f"preprocessing: {module.preprocessing.describe()}",
        f"- case {'x'.join(map(str, shape))}: {kept} of {shape[2]} slices pass the slice "
        "filter (every method runs those; the others are background)",
    ]


def bench(checkpoint: Path | None, device: str, repeats: int, batch_size: int) -> str:
    """Markdown report: seconds per case of the naive loop, batched, batched + TTA."""
    load_start = os.getloadavg()[0]
    dev = pick_device(device)
    module = load_for_inference(checkpoint, dev) if checkpoint else default_module(dev)
    naive_net = copy.deepcopy(module.net).float().to(memory_format=torch.contiguous_format)
    mode = "bf16+cl" if autocast_dtype(dev) else "fp32"
    rows = [
        ("naive: 1 slice at a time", 1, "fp32", "no"),
        ("batched", batch_size, mode, "no"),
        ("batched + TTA (4 flips)", batch_size, mode, "yes"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        case, folder = demo_case(Path(tmp))
        header = nib.load(folder / f"{case.case_id}_flair.nii.gz").header

        def io() -> None:
            loaded = list_cases(folder, labelled=False)[0].load()
            image = segmentation_image(np.zeros(loaded.image.shape[1:]), case.affine, header)
            nib.save(image, Path(tmp) / "seg.nii.gz")

        naive = functools.partial(predict_case_naive, module, naive_net, case)
        fast = functools.partial(predict_case, module, case, batch_size=batch_size)
        replay = functools.partial(
            NetInput.of, case.image, case.affine, module.preprocessing, case.case_id
        )
        timed = [naive, fast, functools.partial(fast, tta=True), replay, io]
        *seconds, replay_s, io_s = best_times(timed, repeats)
    lines = [
        *describe(module, dev, case),
        f"- best of {repeats} interleaved rounds after a warm-up; z-score, resizing and "
        f"post-processing included; reading the 4 NIfTI files + writing the result: {io_s:.2f} s",
        f"- of each row, the preprocessing replay (reorientation, z-score, slice filter, "
        f"resizing; the same in every row): {replay_s:.2f} s",
        f"- 1-minute load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        "the end (other processes on these cores slow every row)",
        "",
        "| method | batch | precision | TTA | s / case | speed-up |",
        "|---|---:|---|---|---:|---:|",
    ]
    for (name, batch, precision, tta), sec in zip(rows, seconds, strict=True):
        lines.append(
            f"| {name} | {batch} | {precision} | {tta} | {sec:.2f} | {seconds[0] / sec:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tumorseg-bench inference [--checkpoint CKPT] [--device auto] [--repeats 5]``."""
    from tumorseg.core import console

    parser = console.Parser(prog="tumorseg-bench inference", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained .ckpt (default: random U-Net)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=console.count(1), default=5, help="timed rounds (5)")
    parser.add_argument("--batch-size", type=console.count(1), default=32, help="slices (32)")
    args = console.start(parser.prog, lambda: parser.parse_args(argv))
    if isinstance(args, int):
        return args
    print(bench(args.checkpoint, args.device, args.repeats, args.batch_size))
    return 0
