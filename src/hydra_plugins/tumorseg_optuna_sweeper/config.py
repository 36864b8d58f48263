"""Structured config of the ``tumorseg_optuna`` sweeper, registered with Hydra's ConfigStore.

A Hydra shell over :mod:`tumorseg.sweep.study`: the fields are the settings of
:class:`tumorseg.sweep.study.StudySweep`, with their defaults and meaning.

Select it with ``defaults: [override /hydra/sweeper: tumorseg_optuna]``. Samplers and pruners
are plain ``_target_`` dicts; the groups ``hydra/sweeper/sampler`` (tpe, random, cmaes, nsgaii) and
``hydra/sweeper/pruner`` (median, hyperband, threshold, nop) swap them whole.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SAMPLERS: dict[str, dict[str, Any]] = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": 42},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": 42},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": 42},  # needs `pip install cmaes`
    # several objectives (direction: [maximize, minimize]); TPE handles them too
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": 42},
}
PRUNERS: dict[str, dict[str, Any]] = {
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 5,
        "n_warmup_steps": 1,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
    },
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.05},
    "nop": {"_target_": "optuna.pruners.NopPruner"},
}


@dataclass
class OptunaSweeperConf:
    """``hydra.sweeper``: an Optuna study whose trials are Hydra jobs."""

    _target_: str = "hydra_plugins.tumorseg_optuna_sweeper.sweeper.OptunaSweeper"
    _recursive_: bool = False  # sampler and pruner reach the sweeper as configs, not objects
    # _self_ first: the sampler and pruner options fill the null fields below
    defaults: list[Any] = field(
        default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}]
    )
    # search space in Hydra's override grammar: choice(...), range(...), interval(a,b),
    # tag(log, interval(a,b)), tag(int, interval(a,b)), a,b,c; plain values are fixed overrides
    params: dict[str, Any] | None = None
    # of the job's return value; a list ([maximize, minimize]) for a job returning one value per
    # objective: a multi-objective study (no pruning), its best trials the Pareto front
    direction: Any = "maximize"
    n_trials: int = 20  # trials in the study in all (finished + running), not per run
    # trials run at once by this sweeper, each in its own process when > 1; null: one per
    # device set of the pool (len(devices) // devices_per_trial), else 1
    n_jobs: Any = None
    storage: str | None = None  # RDB URL (sqlite:///..., postgresql://...); null: in memory
    study_name: str | None = None
    sampler: Any = None
    pruner: Any = None
    monitor: str = "val/dice_mean"  # metric the pruning callback reports each epoch
    # added to every job as ++<callback_key>={_target_: <callback>, ...}; null: no pruning
    callback: str | None = "tumorseg.sweep.runs.OptunaPruning"
    callback_key: str = "callbacks.optuna_pruning"
    tags_key: str | None = "tags"  # job config dict of MLflow tags; gets optuna_study/trial
    mlflow: bool = True  # parent run per study, optuna_state tags, plots (needs logger.mlflow)
    # device pool for parallel trials: auto (every visible GPU; no pool where there is none or
    # trainer.accelerator is cpu), a list of indices ([0,1,2,3]) or null (no pool). Each running
    # trial gets its own devices_per_trial of them (CUDA_VISIBLE_DEVICES) and
    # ++<devices_key>=devices_per_trial
    devices: Any = "auto"
    devices_per_trial: int = 1
    devices_key: str | None = "trainer.devices"
    # with an RDB storage: seconds between heartbeats of running trials; another worker fails
    # a trial whose heartbeat stopped for grace_period (default 2 x interval) and retries it
    # up to max_retry times (its MLflow run ends FAILED). null: no heartbeats
    heartbeat_interval: Any = None
    grace_period: Any = None
    max_retry: Any = 1
    # async: a new job starts as soon as any ends (n_jobs in flight, any launcher); batch: n_jobs
    # jobs at a time, each batch waiting for its slowest (for comparison)
    schedule: str = "async"
    # K-fold cross-validation objective: each trial runs K jobs, <fold_key>=k and <folds_key>=K,
    # and its value is their mean (standard error: the spread over folds). Only fold 0 reports to
    # the pruner. null: one job per trial
    folds: Any = None
    fold_key: str = "data.fold"
    folds_key: Any = "data.folds"
    baseline: bool = True  # trial 0 of a new study runs the config as given, no sampled values


def register() -> None:
    """Store the sweeper, sampler and pruner configs (provider ``tumorseg``)."""
    cs = ConfigStore.instance()
    cs.store(
        group="hydra/sweeper", name="tumorseg_optuna", node=OptunaSweeperConf, provider="tumorseg"
    )
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="tumorseg")
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="tumorseg")


register()
