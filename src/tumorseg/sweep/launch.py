"""How a training job's processes start: DDP children of a Hydra job, and devices from a pool.

**DDP children.** Lightning starts the ranks > 0 of a single-node DDP job by re-running the
command line (``python train.py ARGS`` with ``LOCAL_RANK`` set). In a Hydra multirun that
command line is the whole sweep, so a child would start a sweep of its own, sample its own
Optuna trials and pair with whichever job its parent happens to be in. Instead the parent's job
writes its resolved config to ``<run dir>/ddp_job.yaml`` and names it in ``TUMORSEG_DDP_JOB``;
a child that finds that variable runs exactly that config and nothing else (:func:`ddp_child`).
After the job the parent's process group is destroyed and its environment restored, so the
next job of the multirun launches children of its own and builds a group with them.

Processes started by a cluster (``srun``, ``torchrun``: ``LOCAL_RANK`` set from the start) are
left alone: each of them runs the command line, which there is one job.

When one of those children exits non-zero, Lightning SIGKILLs the process that started them
(so that rank 0 does not hang in a collective). In a sweep that process must be the job's own,
not the sweeper's: the Optuna sweeper runs each trial whose trainer starts children
(:func:`starts_children`) in a fresh process, so a crashed rank fails only its trial.

**Devices.** A parallel sweep gives each job its own devices: the job's process starts with
``CUDA_VISIBLE_DEVICES`` and ``TUMORSEG_DEVICES`` (:data:`.pool.POOL_ENV`: the same indices,
readable on any machine) set; :func:`devices_tag` reports them as the run's ``devices`` tag.

**The local MLflow store.** Jobs that start at once (the pool, joblib, ``submitit_local``) on a
fresh SQLite store race on its schema (``duplicate column name``): :class:`TrackingStore`, a Hydra
callback of every multirun (``conf/hydra/default.yaml``), creates the store before any job starts,
under a lock on its folder, so that sweeps started together do not race on it either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tumorseg.core.files import folder_lock
from tumorseg.sweep.pool import POOL_ENV

log = logging.getLogger(__name__)

DDP_JOB_ENV = "TUMORSEG_DDP_JOB"
# what Lightning's launcher sets in the parent's environment while it starts the children
DDP_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", DDP_JOB_ENV)


def prepare_tracking(config: DictConfig) -> None:
    """Create the local MLflow store (SQLite) that ``config``'s runs log to, if they do. Under
    a lock on the store's folder, so multiruns started together create it one after the other
    and none goes on while another is half-way through."""
    mlflow_cfg = OmegaConf.select(config, "logger.mlflow")
    if not mlflow_cfg:
        return
    from mlflow.tracking import MlflowClient
    from sqlalchemy.engine import make_url

    from tumorseg.tracking.client import tracking_target

    uri, _ = tracking_target(mlflow_cfg.get("tracking_uri"), mlflow_cfg.get("root_dir"))
    database = make_url(uri).database if uri.startswith("sqlite:") else None
    if not database or database == ":memory:":
        return
    folder = Path(database).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


class TrackingStore(Callback):
    """Before a multirun's jobs start: the local MLflow store exists (see the module doc)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_tracking(config)


def external_ranks() -> bool:
    """True when a cluster or launcher (srun, torchrun) started this process as one rank."""
    return "LOCAL_RANK" in os.environ and DDP_JOB_ENV not in os.environ


@contextmanager
def ddp_job(config: Mapping[str, Any], run_dir: str | Path) -> Iterator[None]:
    """Around one job's ``fit``: DDP children it starts run ``config`` (resolved) and only it.

    Does nothing in a process a cluster started as one rank, or in a DDP child itself.
    """
    if "LOCAL_RANK" in os.environ:
        yield
        return
    saved = {k: os.environ.get(k) for k in DDP_ENV}
    path = Path(run_dir) / "ddp_job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    tmp.replace(path)
    os.environ[DDP_JOB_ENV] = str(path.resolve())
    try:
        yield
    finally:
        import torch.distributed as dist

        # Lightning leaves the process group up; the next job would reuse it, peers gone
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def starts_children(trainer: Mapping[str, Any]) -> bool:
    """Whether Lightning starts more processes for ``trainer`` (its config) by re-running the
    command line: a DDP-like strategy (``ddp``, ``auto``, ``fsdp``; not ``ddp_spawn``,
    ``ddp_fork`` or ``single_device``) on more than one device, or on ``auto``/``-1`` devices
    of an accelerator other than the CPU."""
    strategy = trainer.get("strategy") or "auto"
    if isinstance(strategy, Mapping):
        strategy = strategy.get("_target_", "")
    strategy = str(strategy).lower()
    if any(word in strategy for word in ("spawn", "fork", "notebook", "single")):
        return False
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip() in ("auto", "-1"):
        return str(trainer.get("accelerator", "auto")) != "cpu"
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) > 1
    try:
        return int(devices) > 1
    except (TypeError, ValueError):  # a form not known here: assume it may
        return True


def ddp_child_config() -> dict[str, Any] | None:
    """In a DDP child that a job of this project started: that job's resolved config."""
    path = os.environ.get(DDP_JOB_ENV)
    if not path or os.environ.get("LOCAL_RANK", "0") == "0":
        return None
    return yaml.safe_load(Path(path).read_text())


def devices_tag(trainer: Any) -> str:
    """The devices a run trains on, for its ``devices`` MLflow tag: the indices a parallel
    sweep's pool gave the job (``TUMORSEG_DEVICES``), else the physical CUDA indices, else
    ``cpu`` (``cpu x2`` for two processes)."""
    pooled = os.environ.get(POOL_ENV)
    if pooled:
        return pooled
    ids = [int(i) for i in getattr(trainer, "device_ids", []) or []]
    kind = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
    if kind == "cuda":
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        return ",".join(visible[i] if i < len(visible) else str(i) for i in ids)
    n = int(getattr(trainer, "num_devices", 1) or 1) * int(getattr(trainer, "num_nodes", 1) or 1)
    return kind if n == 1 else f"{kind} x{n}"
