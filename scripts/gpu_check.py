"""GPU check: what only a CUDA machine can show, in one command (a few minutes).

    python scripts/gpu_check.py [--work /tmp/gpu-check] [--output gpu_check.md]

1. one training epoch in ``16-mixed`` and one in ``bf16-mixed`` (``python train.py
   trainer=gpu``, demo data, the test stage included);
2. a 2-trial Optuna sweep on the device pool (``hydra.sweeper.devices=auto``): with two or more
   GPUs the trials run at once, each on its own GPU; each trial's ``devices`` tag is checked;
3. ``tumorseg-predict --device cuda`` on a demo case with the checkpoint of step 1, and its
   ``--benchmark``;
4. a throughput table: training slices/s of the default U-Net per precision (fp32, fp16 and
   bf16 autocast, channels-last), 128x128, batch 32.

Without CUDA it prints why it skips and exits 0. Exit 1 when a step fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall time in s. Exits 1 when it fails."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        res = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        print(f"FAILED ({res.returncode}) after {seconds:.0f} s; last lines of {log}:")
        print("\n".join(log.read_text().splitlines()[-30:]))
        sys.exit(1)
    print(f"   ok, {seconds:.1f} s", flush=True)
    return seconds


def throughput(precision: str, steps: int = 30, batch: int = 32, size: int = 128) -> float:
    """Training slices/s of the default U-Net on cuda:0 under ``precision``."""
    import torch

    from tumorseg.models.unet import UNet

    net = UNet(4, 3, [16, 32, 64, 128]).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 4, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = (torch.rand(batch, 3, size, size, device="cuda") > 0.5).float()
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(5):
        train_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: skipped: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none: a CPU build'}; torch.cuda.is_available() is False)"
        )
        return 0
    gpus = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"gpu_check: {gpus} GPU(s): {names}; {versions}")

    work = args.work or Path(tempfile.mkdtemp(prefix="tumorseg-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TUMORSEG_ROOT"] = str(work)  # data, outputs and the MLflow store go there
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    train = [sys.executable, str(ROOT / "train.py")]
    store = f"sqlite:///{work}/mlflow.db"
    small = ["data.demo_cases=8", "trainer.max_epochs=1", f"logger.mlflow.tracking_uri={store}"]
    times = {}
    for precision in ("16-mixed", "bf16-mixed"):
        times[precision] = step(
            f"one epoch, {precision}",
            [*train, "trainer=gpu", f"trainer.precision={precision}", *small],
            work,
            work / f"train_{precision}.log",
        )

    devices = "auto"  # every GPU; with one GPU the two trials take turns on it
    sweep = [*train, "-m", "hparams_search=optuna", "trainer=gpu", *small, "test=false"]
    sweep += ["hydra.sweeper.n_trials=2", f"hydra.sweeper.devices={devices}"]
    sweep += [f"hydra.sweeper.storage=sqlite:///{work}/optuna.db"]
    times["sweep"] = step("2-trial sweep on the pool", sweep, work, work / "sweep.log")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("tumorseg")
    trial_runs = client.search_runs([exp.experiment_id], "tags.optuna_trial != ''")
    tags = sorted(r.data.tags.get("devices", "?") for r in trial_runs)
    print(f"   trial devices: {tags}")
    if gpus >= 2 and len(set(tags)) != len(tags):
        print("FAILED: two trials got the same GPU")
        return 1

    ckpt = sorted((work / "outputs" / "runs").glob("*/checkpoints/epoch_*.ckpt"))[-1]
    case = sorted((work / "data" / "demo").glob("BraTS20_Training_*"))[0]
    predict = shutil.which("tumorseg-predict") or "tumorseg-predict"
    times["predict"] = step(
        "tumorseg-predict --device cuda",
        [predict, "--checkpoint", str(ckpt), "--input", str(case)]
        + ["--output", str(work / "seg.nii.gz"), "--device", "cuda", "--quiet"],
        work,
        work / "predict.log",
    )
    step(
        "tumorseg-predict --benchmark --device cuda",
        [predict, "--benchmark", "--device", "cuda"],
        work,
        work / "predict_benchmark.log",
    )

    rows = [(p, throughput(p)) for p in ("32-true", "16-mixed", "bf16-mixed")]
    base = rows[0][1]
    lines = [
        f"GPU: {names}; {versions}",
        "",
        "| precision | slices/s (train, 128x128, batch 32) | vs. fp32 |",
        "|---|---:|---:|",
        *(f"| {p} | {v:,.0f} | {v / base:.2f}x |" for p, v in rows),
        "",
        "| step | wall time (s) |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in times.items()),
        "",
        "tumorseg-predict --benchmark --device cuda:",
        (work / "predict_benchmark.log").read_text().strip(),
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.write_text(report + "\n")
    print(f"gpu_check: all steps passed (work folder {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
