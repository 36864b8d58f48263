"""Multiruns of ``train.py`` as the tests run them: tiny jobs in a subprocess, MLflow in a SQLite
file under the test's folder, callbacks that fail a job in one DDP rank only or kill a trial's
process, and a trainer that stands in for one on several devices."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from mlflow.tracking import MlflowClient

from tests.conftest import ONE_THREAD, ROOT

TINY = ["debug=tiny", "test=false", "trainer.max_epochs=1"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def train(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` from ``cwd`` in a session of its own. Its output goes to files,
    not pipes, so it returns when train.py exits, even where a DDP rank outlives it; whatever
    of that session still runs then is killed. One intra-op thread per process (``ONE_THREAD``).
    """
    env = {**os.environ, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    out, err = cwd / "train.stdout", cwd / "train.stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())


def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def multirun(
    tmp_path: Path, demo_root: Path, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python train.py -m ARGS`` on the demo data, tiny, logging to ``tracking_uri``."""
    common = [
        *TINY,
        f"data.root={demo_root}",
        f"logger.mlflow.tracking_uri={tracking_uri(tmp_path)}",
    ]
    return train(tmp_path, "-m", *common, *args, timeout=timeout)


def optuna_storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def optuna_sweep(tmp_path: Path, demo_root: Path, *args: str) -> subprocess.CompletedProcess:
    """``multirun`` of ``hparams_search=optuna`` with its study in ``optuna_storage``."""
    storage = f"hydra.sweeper.storage={optuna_storage(tmp_path)}"
    return multirun(tmp_path, demo_root, "hparams_search=optuna", storage, *args)


def mlflow_runs(tmp_path: Path, query: str = "") -> list[Any]:
    """The runs in ``tracking_uri``'s experiment ``tumorseg``, oldest first."""
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("tumorseg")
    return client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"])


def fail_in_rank(rank: int, trials: list[int]) -> str:
    """Override adding :class:`FailInRank` to an Optuna sweep's jobs."""
    target = f"{__name__}.FailInRank"
    return (
        f"++callbacks.fail_in_rank={{_target_:{target},rank:{rank},"
        f"trials:{trials},trial:${{tags.optuna_trial}}}}"
    )


class FailInRank(L.Callback):
    """Raises when training starts, in DDP rank ``rank`` only, if ``trial`` is in ``trials``."""

    def __init__(self, rank: int, trials: list[int], trial: int) -> None:
        self.rank, self.trials, self.trial = rank, list(trials), int(trial)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == self.rank and self.trial in self.trials:
            raise RuntimeError(f"trial {self.trial} fails in rank {self.rank}")


def kill_in_trials(trials: list[int]) -> str:
    """Override adding :class:`KillInTrial` to an Optuna sweep's jobs."""
    target = f"{__name__}.KillInTrial"
    args = f"trials:{trials},trial:${{tags.optuna_trial}}"
    return f"++callbacks.kill_in_trial={{_target_:{target},{args}}}"


class KillInTrial(L.Callback):
    """SIGKILLs its own process when training starts, if ``trial`` is in ``trials``: a trial's
    job process dies without a word, as one killed by the kernel's OOM killer would."""

    def __init__(self, trials: list[int], trial: int) -> None:
        self.trials, self.trial = list(trials), int(trial)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.trial in self.trials:
            os.kill(os.getpid(), signal.SIGKILL)


def meet(folder: Path, jobs: int) -> str:
    """Override adding :class:`Meet` to a multirun's jobs: each waits for ``jobs`` of them."""
    target = f"{__name__}.Meet"
    return f"++callbacks.meet={{_target_:{target},folder:'{folder}',jobs:{jobs}}}"


class Meet(L.Callback):
    """When training starts, leaves a file in ``folder`` and waits until ``jobs`` jobs have left
    one; raises after ``timeout`` seconds. Jobs run one after the other never meet: the first
    one raises, so a test that needs them at once fails however the machine's clock falls."""

    def __init__(self, folder: str, jobs: int, timeout: float = 180) -> None:
        self.folder, self.jobs, self.timeout = Path(folder), int(jobs), float(timeout)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.folder.iterdir())) < self.jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {self.jobs} jobs at once in {self.timeout:.0f} s")
            time.sleep(0.1)


# ``trainer._target_=`` this: the trainer runs on one CPU process whatever ``devices`` it gets
STAND_IN_TRAINER = f"trainer._target_={__name__}.stand_in_trainer"


def stand_in_trainer(devices: Any = 1, **kwargs: Any) -> L.Trainer:
    """A trainer on one CPU process, whatever ``devices`` it is given (stand-in device indices
    are no devices); the run's MLflow tag ``trainer_devices`` records what it was given."""
    logger = kwargs.get("logger")
    if logger:
        logger.tags = {**(logger.tags or {}), "trainer_devices": str(devices)}
    return L.Trainer(**{**kwargs, "devices": 1})
