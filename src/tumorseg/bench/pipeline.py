"""Seconds per case of ``tumorseg-predict`` on a folder, reading and writing included: cases one
after another through the path as it was before (sigmoid probabilities mapped back, batch 32)
next to the command's own (``tumorseg.inference.folder.segment``: reader and writer threads
where there are spare cores, ``spare_cores``), in interleaved rounds.

``python -m tumorseg.bench.pipeline [--cases 4] [--rounds 3] [--batch-size 32]``: the default
U-Net with random weights on generated demo cases (240x240x155); prints the best and median
seconds per case of each, and the fraction of voxels whose labels differ between them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from tumorseg.bench.inference import default_module
from tumorseg.core.labels import from_canonical, target
from tumorseg.data.case import Case
from tumorseg.data.preprocess import NetInput
from tumorseg.data.readers import list_cases
from tumorseg.inference.folder import spare_cores
from tumorseg.inference.predict import autocast_dtype, segmentation_image, slice_probs


def predict_case_before(module, case: Case, batch_size: int = 32) -> np.ndarray:
    """``predict_case`` as it was: every batch through ``slice_probs``, mapped back, decided."""
    replay = NetInput.of(case.image, case.affine, module.preprocessing, case.case_id)
    goal = target(module.hparams.target)
    dtype = autocast_dtype(module.device)
    labels = np.zeros(replay.oriented, dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, len(replay.keep), batch_size):
            x = replay.image[start : start + batch_size]
            probs = replay.back(slice_probs(module, x, False, dtype), goal.background())
            labels[:, :, replay.keep[start : start + batch_size]] = (
                goal.decide(probs).permute(1, 2, 0).numpy()
            )
    return replay.undo(labels)


def sequential(module, folder: Path, out: Path) -> None:
    """The folder as before: read, predict, write, one case after another."""
    for ref in list_cases(folder, labelled=False):
        header = nib.load(ref.paths[0]).header
        case = ref.load()
        labels = predict_case_before(module, case)
        image = segmentation_image(from_canonical(labels, ref.convention), case.affine, header)
        nib.save(image, out / f"{case.case_id}.nii.gz")


def pipelined(module, folder: Path, out: Path, batch_size: int) -> None:
    """The folder through ``tumorseg-predict``'s pipeline."""
    from tumorseg.inference.folder import Request, plan, segment

    args = Request(input=folder, output=out, batch_size=batch_size, quiet=True)
    with contextlib.redirect_stdout(io.StringIO()):
        segment(args, plan(args), module)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tumorseg-bench pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    from tumorseg.data.demo import write_demo

    module = default_module(torch.device("cpu"))
    times: dict[str, list[float]] = {"before": [], "pipeline": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cases"
        write_demo(folder, cases=args.cases, seed=0, progress=False)
        outs = {k: Path(tmp) / k for k in times}
        for out in outs.values():
            out.mkdir()
        load = os.getloadavg()[0]
        sequential(module, folder, outs["before"])  # warm-up
        for _ in range(args.rounds):
            for name in times:
                start = time.perf_counter()
                if name == "before":
                    sequential(module, folder, outs[name])
                else:
                    pipelined(module, folder, outs[name], args.batch_size)
                times[name].append((time.perf_counter() - start) / args.cases)
        differ = total = 0
        for path in sorted(outs["before"].iterdir()):
            a = np.asarray(nib.load(path).dataobj)
            b = np.asarray(nib.load(outs["pipeline"] / path.name).dataobj)
            differ += int((a != b).sum())
            total += a.size
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.cases} demo cases "
        f"240x240x155; 1-minute load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print("| path | s / case (best) | s / case (median) | cases / min (best) |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        best = min(values)
        label = (
            "before: one case after another, batch 32"
            if name == "before"
            else f"tumorseg-predict (threads: {'yes' if spare_cores(module) else 'no'}), "
            f"batch {args.batch_size}"
        )
        print(f"| {label} | {best:.2f} | {statistics.median(values):.2f} | {60 / best:.1f} |")
    print(f"labels differ on {differ} of {total} voxels ({differ / total:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
