"""The ``tumorseg_pool`` launcher: a Hydra shell over :mod:`tumorseg.sweep.runners` (and
:mod:`tumorseg.sweep.pool`), a plain multirun's jobs in parallel, each on its own devices.

``python train.py -m model=unet,attention_unet,residual_unet hydra/launcher=tumorseg_pool``
runs one job per device set of the pool at once (``devices: auto``, every visible GPU, one per
job), each in a fresh process with ``CUDA_VISIBLE_DEVICES`` set to its devices and
``++trainer.devices=<how many>``. Jobs whose trainer runs on the CPU get no pool; ``n_jobs``
still runs them in parallel processes.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from tumorseg.sweep.runners import JobFailed, run_multirun

log = logging.getLogger(__name__)


@dataclass
class PoolLauncherConf:
    """``hydra.launcher`` of ``tumorseg_pool``."""

    _target_: str = "hydra_plugins.tumorseg_pool_launcher.launcher.PoolLauncher"
    n_jobs: Any = None  # jobs at once; null: one per device set of the pool, else 1
    # auto: every visible GPU (no pool when trainer.accelerator is cpu); [0,1,2,3]; null: none
    devices: Any = "auto"
    devices_per_job: int = 1
    devices_key: Any = "trainer.devices"  # each job gets ++<key>=devices_per_job; null: not


ConfigStore.instance().store(
    group="hydra/launcher", name="tumorseg_pool", node=PoolLauncherConf, provider="tumorseg"
)


class PoolLauncher(Launcher):
    def __init__(
        self,
        n_jobs: int | None = None,
        devices: Any = "auto",
        devices_per_job: int = 1,
        devices_key: str | None = "trainer.devices",
    ) -> None:
        self.n_jobs, self.devices_per_job, self.devices_key = n_jobs, devices_per_job, devices_key
        if not isinstance(devices, (str, int, type(None))):
            devices = OmegaConf.to_container(devices, resolve=True)
        self.devices = devices

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        results = run_multirun(
            self.hydra_context,
            self.config,
            self.task_function,
            job_overrides,
            initial_job_idx,
            n_jobs=self.n_jobs,
            devices=self.devices,
            per_job=self.devices_per_job,
            devices_key=self.devices_key,
        )
        returns = []
        for idx, (overrides, result) in enumerate(zip(job_overrides, results, strict=True)):
            ret = JobReturn(overrides=list(overrides))
            if result.error_text:
                ret.status = JobStatus.FAILED
                ret._return_value = result.error or JobFailed(result.error_text)
                log.error(f"job #{initial_job_idx + idx} failed: {result.error_text}")
            else:
                ret.status, ret._return_value = JobStatus.COMPLETED, result.value
            returns.append(ret)
        return returns
