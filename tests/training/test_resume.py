"""Kill a training run during a later epoch, resume it from ``last.ckpt``, read MLflow."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from lightning.pytorch import Callback
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from tests.conftest import ROOT, compose_tiny, run_train
from tumorseg.train import run

pytestmark = pytest.mark.slow

EPOCHS = 6
BATCHES = 8  # at most this many training batches per epoch


def mlflow_runs(cwd: Path):
    (db,) = cwd.rglob("mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tumorseg")
    return client, client.search_runs([exp.experiment_id])


def completed_epoch(path: Path) -> int | None:
    """The epoch stored in ``last.ckpt``, None while it is missing or being written."""
    try:
        return int(torch.load(path, weights_only=False, map_location="cpu")["epoch"])
    except Exception:  # absent, or caught mid-write
        return None


def test_kill_in_a_later_epoch_and_resume(tmp_path, demo_root):
    args = [
        "debug=tiny",
        f"data.root={demo_root}",
        f"trainer.max_epochs={EPOCHS}",
        f"trainer.limit_train_batches={BATCHES}",
        "test=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill once epochs 0 and 1 are complete, i.e. while epoch 2 trains.
    deadline, last, seen, stamp = time.time() + 900, None, None, None  # a loaded machine
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list((tmp_path / "outputs").glob("runs/*/checkpoints/last.ckpt"))
            if found and found[0].stat().st_mtime_ns != stamp:
                last, stamp = found[0], found[0].stat().st_mtime_ns
                seen = completed_epoch(last)
                if seen is not None and seen >= 1:
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert seen is not None and seen >= 1, f"no second epoch within the time limit ({seen})"
    time.sleep(0.5)
    killed = completed_epoch(last)
    assert killed is not None and 1 <= killed < EPOCHS - 1, killed
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    run_id = runs[0].info.run_id

    resumed_at = int(time.time() * 1000)
    res = run_train(tmp_path, f"ckpt_path={last}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == run_id

    # The resumed process starts at the epoch after the last completed one.
    epochs = client.get_metric_history(run_id, "epoch")
    after = sorted(int(m.value) for m in epochs if m.timestamp >= resumed_at)
    assert after and after[0] == killed + 1, (killed, after)
    # Exactly one validation value per epoch, none missing, none repeated.
    history = client.get_metric_history(run_id, "val/dice_mean")
    steps = sorted(m.step for m in history)
    epoch_at = {m.step: int(m.value) for m in epochs}  # "epoch" is logged with every metric
    assert [epoch_at[s] for s in steps] == list(range(EPOCHS)), (steps, epoch_at)
    assert len({b - a for a, b in zip(steps, steps[1:], strict=False)}) == 1, steps  # no gap
    assert completed_epoch(last) == EPOCHS - 1  # last.ckpt kept up to date


class ResumeProbe(Callback):
    """Stops a fresh run after epoch ``stop_after``; in a resumed run, records the optimizer's
    and scheduler's state as fit starts (after Lightning restored the checkpoint)."""

    seen: ClassVar[dict] = {}

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path:
            (optimizer,) = trainer.optimizers
            (config,) = trainer.lr_scheduler_configs
            ResumeProbe.seen.update(
                optimizer=copy.deepcopy(optimizer.state_dict()),
                scheduler=copy.deepcopy(config.scheduler.state_dict()),
                lr=optimizer.param_groups[0]["lr"],
                epoch=trainer.current_epoch,
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.ckpt_path and trainer.current_epoch == self.stop_after:
            trainer.should_stop = True


def test_resume_continues_optimizer_and_scheduler(tmp_path, demo_root):
    """A resumed run goes on with the checkpoint's AdamW moments and step count and the cosine
    schedule's position and learning rate, not with a fresh optimizer and schedule."""
    ResumeProbe.seen.clear()
    probe = f"+callbacks.resume_probe._target_={__name__}.ResumeProbe"
    cfg = compose_tiny(
        tmp_path,
        demo_root,
        [
            "trainer.max_epochs=4",
            "~logger",
            "callbacks.lr_monitor=null",
            "test=false",
            probe,
            "+callbacks.resume_probe.stop_after=1",
        ],
    )
    run(cfg)  # stops after epoch 1 of 4
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 1
    (opt_ckpt,), (sched_ckpt,) = ckpt["optimizer_states"], ckpt["lr_schedulers"]
    assert sched_ckpt["last_epoch"] == 2  # stepped after epochs 0 and 1
    lr0 = cfg.model.optimizer.lr
    assert sched_ckpt["_last_lr"][0] < lr0

    with open_dict(cfg):
        cfg.ckpt_path = str(last)
    run(cfg)
    seen = ResumeProbe.seen
    assert seen["epoch"] == 2
    state = seen["optimizer"]["state"]
    assert sorted(state) == sorted(opt_ckpt["state"]) and state
    for i, kept in opt_ckpt["state"].items():
        assert float(state[i]["step"]) == float(kept["step"]) > 0, i
        assert torch.equal(state[i]["exp_avg"], kept["exp_avg"]), i
        assert torch.equal(state[i]["exp_avg_sq"], kept["exp_avg_sq"]), i
    assert seen["scheduler"]["last_epoch"] == sched_ckpt["last_epoch"] == 2
    assert seen["lr"] == pytest.approx(sched_ckpt["_last_lr"][0])
    assert seen["lr"] != pytest.approx(lr0)  # not the schedule's start
