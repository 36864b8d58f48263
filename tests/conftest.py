"""Shared fixtures: a small demo data set written once, and a tiny composed config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tumorseg.config import CONF_DIR
from tumorseg.data.demo import write_demo

ROOT = Path(__file__).resolve().parents[1]
# Environment of the training subprocesses: one intra-op thread each. The tests' tiny nets gain
# nothing from a second thread, and two jobs (or DDP ranks) with two threads each on a 2-core
# machine slow every step many times over.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Lightning's MLFlowLogger calls mlflow.set_tracking_uri, which exports MLFLOW_TRACKING_URI into
# the process: a test that trains in-process would send every later test's runs (and those of
# the subprocesses they start) to its store. Each test starts and ends with the value the
# session started with.
_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def _reset_tracking_uri() -> None:
    if _TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = _TRACKING_URI
    try:
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return
    if hasattr(utils, "_tracking_uri"):
        utils._tracking_uri = None


@pytest.fixture(autouse=True)
def _session_tracking_uri():
    _reset_tracking_uri()
    yield
    _reset_tracking_uri()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four demo cases in the BraTS 2020 layout (shared, do not modify)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, cases=4, seed=0, progress=False)
    return root


# One batch of each stage, nothing logged: what ``debug=default`` does, on top of ``debug=tiny``
# (a second ``debug=`` choice would replace ``tiny`` rather than add to it).
FAST_DEV_RUN = ("+trainer.fast_dev_run=true", "~logger", "callbacks.lr_monitor=null", "test=false")


@pytest.fixture(scope="session")
def easy_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four ``--difficulty easy`` demo cases: a clean signal for short learning tests."""
    root = tmp_path_factory.mktemp("demo_easy")
    write_demo(root, cases=4, seed=0, progress=False, difficulty="easy")
    return root


def compose_tiny(tmp_path: Path, demo_root: Path, overrides: list[str] = ()) -> DictConfig:
    """The train config shrunk by ``debug=tiny``, writing everything under ``tmp_path``."""
    if any(o.lstrip("+~").startswith("debug=") for o in overrides):
        raise ValueError("compose_tiny already chooses debug=tiny; another debug= replaces it")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=tiny",
                f"data.root={demo_root}",
                f"paths.root_dir={tmp_path}",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    return cfg


def val_dice_of(cfg: DictConfig, ckpt: Path) -> float:
    """``val/dice_mean`` of checkpoint ``ckpt`` recomputed by a fresh validation pass over the
    validation batches of ``cfg`` (after ``run(cfg)``, which settles its precision)."""
    import hydra
    import lightning as L

    from tumorseg.training.module import load_checkpoint

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        limit_val_batches=cfg.trainer.get("limit_val_batches", 1.0),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    (out,) = trainer.validate(load_checkpoint(ckpt), datamodule=datamodule, verbose=False)
    return out["val/dice_mean"]


def run_train(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` from ``cwd`` (outputs, data and mlruns land there)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
