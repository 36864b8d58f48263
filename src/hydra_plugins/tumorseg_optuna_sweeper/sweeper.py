"""The ``tumorseg_optuna`` sweeper: an Optuna study (ask and tell) whose trials are Hydra jobs.

Each trial's job gets the sampled values as overrides, plus ``++callbacks.optuna_pruning=...``
(per-epoch reports and pruning, see :mod:`tumorseg.sweep.runs`) and ``++tags.optuna_study/trial``.
A job that returns a number (a :class:`tumorseg.sweep.objective.Score` carries its standard error),
or a list of them for a study of several objectives (``direction: [maximize, minimize]``), is
COMPLETE; one that raises :class:`optuna.TrialPruned` is PRUNED; any other exception, or no
finite value, is FAIL with the reason in user attr ``fail_reason``, and the sweep goes on.

Trial 0 of a new study is the baseline: the config as given, no sampled values (its params:
the config's own values where they lie in the search space). With ``folds=K`` each trial runs
K jobs (``data.fold=k``) and its value is their mean, its standard error their spread; only
fold 0 reports to the pruner. Several objectives: no pruning; the summary shows the Pareto
front. Single objective: it lists the trials within one standard error of the best.

``n_trials`` is the size of the study, not of this run: a rerun (or a second worker on the same
storage) only runs what is missing, counting finished and running trials. A trial is reserved
(the study counted and the trial created) under the study's lock, so workers sharing a storage
never run more than ``n_trials`` between them. ``n_jobs`` jobs are in flight at once and a new
one starts as soon as any ends (``schedule=async``; ``schedule=batch``: ``n_jobs`` at a time,
each batch waiting for its slowest): with Hydra's basic launcher each in a fresh spawned process
on its own devices (:mod:`.pool`), with another launcher (joblib, submitit) each one launcher
call in a thread of its own (:mod:`.jobs`). Each sweep reports its slot utilisation. Trials
whose trainer starts DDP ranks by re-running the command line (``trainer=ddp`` on several
devices) run in fresh processes even one at a time: when a rank fails, Lightning SIGKILLs the
process that started the ranks, which must be the trial's, not the sweeper's.

Workers on other machines: with ``heartbeat_interval`` set, this sweeper records a heartbeat for
each trial it runs, and fails the trials of workers that stopped beating for ``grace_period``
(killed, machine lost), retrying each up to ``max_retry`` times and ending its MLflow run
FAILED. A worker whose own trials are done waits for such trials before it exits.

Heavy imports (torch, lightning, mlflow via :mod:`tumorseg.sweep.runs`) happen inside ``sweep``, so
Hydra's plugin scan at every start stays cheap. No ``from __future__ import annotations``: Hydra's
scan runs this module before it is in ``sys.modules``, where string annotations break dataclasses.
"""

import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Quote, QuotedString, Transformer
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.tumorseg_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.tumorseg_optuna_sweeper.jobs import InlineJobs, LauncherThreads, SlotClock
from hydra_plugins.tumorseg_optuna_sweeper.pool import (
    DevicePool,
    JobFailed,
    JobProcesses,
    visible_devices,
)

log = logging.getLogger(__name__)
__all__ = ["OptunaSweeper", "OptunaSweeperConf"]
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


@dataclass
class Outcome:
    """How a trial's job (or its folds) ended: the objective values and their standard errors
    (``None`` where the job did not tell)."""

    state: TrialState
    values: list[float] | None = None
    reason: str = ""
    stderrs: list[float | None] | None = None

    @property
    def value(self) -> float | None:
        """The first objective's value."""
        return self.values[0] if self.values else None


@dataclass
class Job:
    """One Hydra job of a trial: the trial's only one, or that of one fold."""

    trial: optuna.Trial
    fold: int | None
    number: int  # hydra.job.num
    overrides: list[str]

    @property
    def key(self) -> tuple[int, int | None]:
        return (self.trial.number, self.fold)


@dataclass
class TrialJobs:
    """A reserved trial: how many of its jobs must complete, which did, how many run."""

    trial: optuna.Trial
    expected: int
    running: int = 0
    told: bool = False
    outcomes: list[Outcome] = dataclass_field(default_factory=list)
    fold_values: dict[str, Any] = dataclass_field(default_factory=dict)


_MISFIT = object()


def _fitting(dist: BaseDistribution, value: Any) -> Any:
    """``value`` as a param of ``dist`` (for a categorical: the matching choice, which may be
    the override text of a list), else ``_MISFIT``."""
    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if isinstance(choice, bool) == isinstance(value, bool) and choice == value:
                return choice
            if isinstance(choice, str) and not isinstance(value, str) and value is not None:
                try:
                    parsed = OverridesParser.create().parse_override(f"k={choice}").value()
                except Exception:
                    continue
                if parsed == value:
                    return choice
        return _MISFIT
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _MISFIT
    if isinstance(dist, IntDistribution):
        if not float(value).is_integer():
            return _MISFIT
        value = int(value)
    else:
        value = float(value)
    return value if dist._contains(dist.to_internal_repr(value)) else _MISFIT


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def outcome_of(job: Callable[[], Any]) -> Outcome:
    """Run ``job`` (returning the job's value) and classify how it ended. A job returns a
    number (a :class:`tumorseg.sweep.objective.Score` carries its standard error) or a list of them,
    one per objective."""
    from tumorseg.sweep.objective import stderr_of

    try:
        value = job()
    except optuna.TrialPruned as err:
        return Outcome(TrialState.PRUNED, reason=str(err))
    except JobFailed as err:  # failed in another process; the message names the error
        return Outcome(TrialState.FAIL, reason=str(err))
    except Exception as err:
        log.warning("job failed", exc_info=err)
        return Outcome(TrialState.FAIL, reason=f"{type(err).__name__}: {err}")
    many = isinstance(value, (list, tuple, ListConfig))
    items = list(value) if many else [value]
    if not items or not all(_finite(v) for v in items):
        what = "finite numbers" if many else "a finite number"
        return Outcome(TrialState.FAIL, reason=f"job returned {value!r}, not {what}")
    return Outcome(
        TrialState.COMPLETE, values=[float(v) for v in items], stderrs=[stderr_of(v) for v in items]
    )


def fold_outcome(outcomes: list[Outcome]) -> Outcome:
    """A trial's outcome from its folds' (all COMPLETE): per objective, the mean over folds
    and, as its standard error, their spread (:func:`tumorseg.sweep.objective.fold_mean`)."""
    from tumorseg.sweep.objective import fold_mean

    means = [fold_mean([o.values[i] for o in outcomes]) for i in range(len(outcomes[0].values))]
    return Outcome(
        TrialState.COMPLETE, values=[float(m) for m in means], stderrs=[m.stderr for m in means]
    )


# --- search space: Hydra's override grammar -> Optuna distributions -------------------------


def distribution(override: Override) -> BaseDistribution:
    """``choice``/``a,b`` -> categorical, ``range`` -> int (or categorical for floats),
    ``interval`` -> float, with tags ``log`` and ``int``."""
    value = override.value()
    if override.is_choice_sweep():
        # str, int, float, bool stay; lists and dicts become their override text ("[8,16]")
        return CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if values and value.step > 0 and all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return CategoricalDistribution(values)
    if override.is_interval_sweep():
        use_log = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=use_log)
        return FloatDistribution(value.start, value.end, log=use_log)
    raise HydraException(f"{override.input_line}: not a sweep Optuna can sample")


def search_space(overrides: Iterable[Override]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Distributions of the sweep overrides by key; the other overrides as fixed strings. A
    later override of a key replaces an earlier one (the command line wins over ``params``)."""
    by_key = {o.get_key_element(): o for o in overrides}
    space = {k: distribution(o) for k, o in by_key.items() if o.is_sweep_override()}
    fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
    return space, fixed


def sampled_override(key: str, value: Any) -> str:
    """A sampled value as an override. Strings go in as written in the search space, so the
    choice ``"[8,16,32]"`` sets a list."""
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}" if isinstance(value, str) else f"{key}={Transformer.str(value)}"


def render(value: Any) -> str:
    """``value`` in override grammar, strings always quoted (a name like ``2024`` stays a str)."""
    if isinstance(value, str):
        return QuotedString(text=value, quote=Quote.single).with_quotes()
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    return Transformer.str(value)


@contextmanager
def _study_lock(storage: str | None) -> Iterator[None]:
    """Serialise, between workers sharing one storage, the study and MLflow set-up (fresh
    databases cannot be set up by two processes at once) and each trial's reservation (count,
    then create): a file lock beside a SQLite file, an advisory lock on PostgreSQL."""
    from tumorseg.sweep.runs import database_lock, sqlite_path

    path = sqlite_path(storage)
    try:
        import fcntl
    except ImportError:  # not POSIX
        path = None
    if path is None:
        with database_lock(storage, "study set-up"):
            yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """Records a heartbeat for each trial this sweeper runs, every ``interval`` seconds, so
    workers elsewhere can tell its trials from those of a worker that died."""

    def __init__(self, storage: Any, interval: float) -> None:
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        self.thread.start()

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # a database hiccup: try again next beat
                    log.warning("heartbeat of trial id %d failed: %s", trial_id, err)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


class OptunaSweeper(Sweeper):
    """Runs ``n_trials`` Hydra jobs in all as trials of an Optuna study (see the module doc)."""

    def __init__(
        self,
        params: DictConfig | None = None,
        direction: Any = "maximize",
        n_trials: int = 20,
        n_jobs: int | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        sampler: DictConfig | None = None,
        pruner: DictConfig | None = None,
        monitor: str = "val/dice_mean",
        callback: str | None = "tumorseg.sweep.runs.OptunaPruning",
        callback_key: str = "callbacks.optuna_pruning",
        tags_key: str | None = "tags",
        mlflow: bool = True,
        devices: Any = "auto",
        devices_per_trial: int = 1,
        devices_key: str | None = "trainer.devices",
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        max_retry: int | None = 1,
        schedule: str = "async",
        folds: int | None = None,
        fold_key: str = "data.fold",
        folds_key: str | None = "data.folds",
        baseline: bool = True,
    ) -> None:
        directions = list(direction) if isinstance(direction, (list, tuple, ListConfig)) else []
        directions = directions or [direction]
        if not set(directions) <= {"maximize", "minimize"}:
            raise HydraException(
                f"hydra.sweeper.direction: maximize, minimize or a list of them, not {direction}"
            )
        if schedule not in ("async", "batch"):
            raise HydraException(f"hydra.sweeper.schedule: async or batch, not {schedule}")
        if folds is not None and folds < 2:
            raise HydraException(f"hydra.sweeper.folds: >= 2 or null, not {folds}")
        self.directions = [str(d) for d in directions]
        self.schedule, self.folds, self.fold_key, self.folds_key = (
            schedule,
            folds,
            fold_key,
            folds_key,
        )
        self.baseline = baseline
        if (n_jobs is not None and n_jobs < 1) or n_trials < 0 or devices_per_trial < 1:
            raise HydraException(
                "hydra.sweeper: n_jobs and devices_per_trial must be >= 1 and n_trials >= 0"
            )
        self.params = OmegaConf.to_container(params, resolve=True) if params else {}
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.storage, self.study_name = storage or None, study_name
        self.sampler_cfg = OmegaConf.to_container(sampler, resolve=True) if sampler else {}
        self.pruner_cfg = OmegaConf.to_container(pruner, resolve=True) if pruner else {}
        self.monitor, self.callback, self.callback_key = monitor, callback, callback_key
        self.tags_key, self.use_mlflow = tags_key, mlflow
        if isinstance(devices, (DictConfig, ListConfig)):
            devices = OmegaConf.to_container(devices, resolve=True)
        self.devices, self.devices_per_trial, self.devices_key = (
            devices,
            devices_per_trial,
            devices_key,
        )
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.max_retry = max_retry
        self.heartbeat: _Heartbeat | None = None
        self.space: dict[str, BaseDistribution] = {}
        self.fixed: list[str] = []
        self.runs: Any = None  # tumorseg.sweep.runs.StudyRuns when MLflow is on
        self.exhausted = False  # the sampler has nothing left to try
        self.label = ""
        self.clock: SlotClock | None = None

    @property
    def multi(self) -> bool:
        """Several objectives: a multi-objective study, without pruning."""
        return len(self.directions) > 1

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.study_name = self.study_name or str(config.hydra.job.name)

    # --- the sweep ---------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[FrozenTrial]:
        from tumorseg.sweep.runs import absolute_url, storage_label

        self.storage = absolute_url(self.storage)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [
            f"{k}={v if isinstance(v, str) else Transformer.str(v)}" for k, v in self.params.items()
        ]
        self.space, self.fixed = search_space(parser.parse_overrides([*lines, *arguments]))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # also fixes ${now:} for every job
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self.label = storage_label(self.storage, str(sweep_dir))
        basic = type(self.launcher).__name__ == "BasicLauncher"
        pool = self._device_pool(basic)
        self.n_jobs = self._jobs(pool)

        with _study_lock(self.storage):
            study = self._open_study()
            self.runs = self._guard("MLflow set-up", self._open_runs)
            self._fail_stale(study)
            if self.baseline and not study.get_trials(deepcopy=False):
                self._enqueue_baseline(study)
        before = {t.number for t in study.get_trials(deepcopy=False)}
        log.info(
            "study %s (%s): %d trials of %d, %d to run, %d at a time%s; space %s",
            self.study_name,
            self.label,
            len(self._taken(study)),
            self.n_trials,
            self._todo(study),
            self.n_jobs,
            f" on devices {pool.devices}, {pool.per_job} per trial" if pool else "",
            list(self.space),
        )
        if self.multi and self.pruner_cfg:
            log.info(
                "%d objectives: pruning is off (Optuna prunes single-objective studies)",
                len(self.directions),
            )
        if self.folds:
            log.info("%d folds per trial; only fold 0 reports to the pruner", self.folds)
        if self.heartbeat_interval and self.storage:
            self.heartbeat = _Heartbeat(study._storage, self.heartbeat_interval)
        self.clock = SlotClock(self.n_jobs)
        try:
            while True:
                with self._runner(basic, pool) as runner:
                    self._run_jobs(study, runner)
                if not self._wait_for_others(study):
                    break
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self._report(study, sweep_dir)
        return [t for t in study.get_trials() if t.number not in before]

    def _starts_ranks(self) -> bool:
        """Whether the trials' trainer starts DDP ranks of its own (see the module doc)."""
        from tumorseg.sweep.launch import starts_children

        keys = ("strategy", "accelerator", "devices")
        trainer = {k: OmegaConf.select(self.config, f"trainer.{k}") for k in keys}
        if isinstance(trainer["strategy"], DictConfig):
            trainer["strategy"] = OmegaConf.select(self.config, "trainer.strategy._target_")
        if isinstance(trainer["devices"], ListConfig):
            trainer["devices"] = list(trainer["devices"])
        return starts_children({k: v for k, v in trainer.items() if v is not None})

    def _device_pool(self, basic: bool) -> DevicePool | None:
        """The pool of ``devices`` (``auto``: every visible GPU, for jobs not on the CPU)."""
        if self.devices is None:
            return None
        accelerator = str(OmegaConf.select(self.config, "trainer.accelerator", default="auto"))
        if self.devices == "auto" and accelerator == "cpu":
            return None
        devices = visible_devices(self.devices)
        if not devices:
            if self.devices != "auto":
                raise HydraException("hydra.sweeper.devices: an empty list; use null for none")
            return None
        if not basic:
            # a list asked for the pool; auto (the default) only finds GPUs the launcher places
            say = log.info if self.devices == "auto" else log.warning
            say(
                "hydra.sweeper.devices: the %s launcher places jobs itself; no device pool",
                type(self.launcher).__name__,
            )
            return None
        return DevicePool(devices, self.devices_per_trial)

    def _jobs(self, pool: DevicePool | None) -> int:
        """``n_jobs``, by default one per device set of the pool (else 1)."""
        if pool is None:
            return self.n_jobs or 1
        if self.n_jobs is not None and self.n_jobs > pool.slots:
            log.warning(
                "n_jobs=%d, but %d devices hold only %d trials of %d devices: %d at a time",
                self.n_jobs,
                len(pool.devices),
                pool.slots,
                pool.per_job,
                pool.slots,
            )
        return min(self.n_jobs or pool.slots, pool.slots)

    def _open_study(self) -> optuna.Study:
        from tumorseg.sweep.runs import open_storage

        storage = None
        if self.storage:
            beats = {}
            if self.heartbeat_interval:
                beats = {
                    "heartbeat_interval": self.heartbeat_interval,
                    "grace_period": self.grace_period,
                }
            storage = open_storage(self.storage, **beats)
        pruner = instantiate(self.pruner_cfg) if self.pruner_cfg and not self.multi else None
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            directions=self.directions,
            pruner=pruner,
            load_if_exists=True,
        )
        found = [d.name.lower() for d in study.directions]
        if found != self.directions:
            raise HydraException(
                f"study {self.study_name} in {self.label} goes {found}, not {self.directions}: "
                "pick another study_name"
            )
        # a resumed study must not replay the sampler's first draws: seed + trials so far
        sampler_cfg = dict(self.sampler_cfg)
        if sampler_cfg.get("seed") is not None:
            sampler_cfg["seed"] = int(sampler_cfg["seed"]) + len(study.get_trials(deepcopy=False))
        if sampler_cfg:
            study.sampler = instantiate(sampler_cfg)
        return study

    def _fail_stale(self, study: optuna.Study, local: bool = True) -> None:
        """FAIL running trials whose sweeper is gone: with ``local``, those of this machine
        whose sweeper process has ended; with heartbeats, any not beating for
        ``grace_period``."""
        host = socket.gethostname()
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in running if local else ():
            where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            if where == host and pid.isdigit() and not _alive(int(pid)):
                reason = f"stale: its sweeper (pid {pid} on {host}) ended while it ran"
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                log.warning("trial %d: %s", t.number, reason)
                self._on_stale(study, study._storage.get_trial(t._trial_id))
        if self.heartbeat_interval and self.storage:
            self._fail_by_heartbeat(study)

    def _fail_by_heartbeat(self, study: optuna.Study) -> None:
        """Optuna's ``fail_stale_trials``, with the reason recorded before the trial ends."""
        storage = study._storage
        grace = self.grace_period or 2 * self.heartbeat_interval
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            trial = storage.get_trial(trial_id)
            reason = (
                f"stale: no heartbeat from its sweeper ({trial.user_attrs.get('worker', '?')}) "
                f"for {grace} s"
            )
            try:
                storage.set_trial_user_attr(trial_id, "fail_reason", reason)
                if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
            log.warning("trial %d: %s", trial.number, reason)
            self._on_stale(study, storage.get_trial(trial_id))

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial failed because its worker died: queue a retry with the same params (up to
        ``max_retry``) and end its MLflow run FAILED."""
        retries = int(trial.user_attrs.get("retries", 0))
        if self.max_retry and retries < self.max_retry:  # the same params, once more
            attrs = {"retry_of": trial.number, "retries": retries + 1}
            if self._baseline(trial):
                attrs["baseline"] = True
            study.enqueue_trial(trial.params, user_attrs=attrs)
            log.info(
                "trial %d queued again (retry %d of %d)", trial.number, retries + 1, self.max_retry
            )
        if self.runs is not None:
            run_id = trial.user_attrs.get("mlflow_run_id")
            self._guard("MLflow tag", self.runs.mark, trial.number, TrialState.FAIL, run_id)

    def _wait_for_others(self, study: optuna.Study) -> bool:
        """With heartbeats, after this sweeper's own trials: while trials of other workers run,
        wait and fail those whose worker died (their retries may then run here)."""
        if self.heartbeat is None or self.exhausted:
            return False
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return False
        log.info("waiting for trials %s of other workers", [t.number for t in running])
        time.sleep(max(1.0, min(self.heartbeat_interval, 10)))
        self._fail_stale(study, local=False)  # as on a cluster: the heartbeat alone decides
        return True

    def _open_runs(self) -> Any:
        from tumorseg.sweep.runs import StudyRuns

        mlflow_cfg = OmegaConf.select(self.config, "logger.mlflow")
        if not self.use_mlflow or not mlflow_cfg:
            return None
        mlflow_cfg = OmegaConf.to_container(mlflow_cfg, resolve=True)
        return StudyRuns.open(mlflow_cfg, self.study_name, self.label)

    @staticmethod
    def _taken(study: optuna.Study) -> list[FrozenTrial]:
        """Trials that count towards ``n_trials``: all but waiting ones and failures that a
        retry replaced."""
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        return [
            t
            for t in trials
            if t.state in TAKEN and not (t.state == TrialState.FAIL and t.number in retried)
        ]

    def _todo(self, study: optuna.Study) -> int:
        if self.exhausted:
            return 0
        return self.n_trials - len(self._taken(study))

    def _reserve(self, study: optuna.Study, most: int = 1) -> list[optuna.Trial]:
        """Up to ``most`` new trials, as many as the study still lacks. Counting and creating
        happen under the study's lock: two workers that both saw the study one trial short
        would otherwise each create one."""
        with _study_lock(self.storage):
            return [self._ask(study) for _ in range(min(most, self._todo(study)))]

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        from tumorseg.sweep.runs import LIVE_TRIALS

        space = self.space
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting and self._baseline(waiting[0]):  # ask takes the oldest waiting trial
            fits, _ = self._baseline_params()
            space = {k: d for k, d in self.space.items() if k in fits}
        with warnings.catch_warnings():  # heartbeats are ours here, not Study.optimize's
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            trial = study.ask(space)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("sweep_dir", str(self.config.hydra.sweep.dir))
        if self.heartbeat is not None:
            self.heartbeat.add(trial._trial_id)
        if self.storage is None:
            LIVE_TRIALS[(study.study_name, trial.number)] = trial
        return trial

    def _baseline_params(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The config's own values of the searched keys: those that lie in their distribution
        (recorded as the baseline's params), and those that do not (run, but not recorded)."""
        choices = OmegaConf.select(self.config, "hydra.runtime.choices", default=None) or {}
        fits, misfits = {}, {}
        for key, dist in self.space.items():
            name = key.lstrip("+~")
            try:
                if name in choices:
                    value = choices[name]
                else:
                    value = OmegaConf.select(self.config, name, default=None)
                    if isinstance(value, (DictConfig, ListConfig)):
                        value = OmegaConf.to_container(value, resolve=True)
            except Exception:  # an interpolation that resolves in the job only
                value = None
            fitted = _fitting(dist, value)
            if fitted is _MISFIT:
                misfits[key] = value
            else:
                fits[key] = fitted
        return fits, misfits

    def _enqueue_baseline(self, study: optuna.Study) -> None:
        """Trial 0 of a new study: the config as given, without sampled values."""
        fits, misfits = self._baseline_params()
        study.enqueue_trial(fits, user_attrs={"baseline": True})
        log.info("trial 0 is the baseline: the config as given, no sampled values")
        for key, value in misfits.items():
            log.warning(
                "baseline: %s=%r is not in the search space %s; the baseline runs it, its "
                "trial does not record it as a param",
                key,
                value,
                self.space[key],
            )

    @staticmethod
    def _baseline(trial: optuna.Trial | FrozenTrial) -> bool:
        return bool(trial.user_attrs.get("baseline"))

    def _job_overrides(
        self, trial: optuna.Trial, fold: int | None = None, parent: str | None = None
    ) -> list[str]:
        """The job's overrides: the fixed ones, the sampled values (none for the baseline),
        the pruning callback, MLflow tags and, for a fold, ``data.fold``/``data.folds``."""
        out = list(self.fixed)
        if not self._baseline(trial):
            out += [sampled_override(k, v) for k, v in trial.params.items()]
        if fold is not None:
            out.append(f"{self.fold_key}={fold}")
            if self.folds_key:
                out.append(f"{self.folds_key}={self.folds}")
        if self.callback:
            callback = {
                "_target_": self.callback,
                "study_name": self.study_name,
                "trial_number": trial.number,
                "storage": self.storage,
                "pruner": None if self.multi else (self.pruner_cfg or None),
                "monitor": self.monitor,
                "parent_run_id": parent,
                # several objectives: no pruning; folds: only fold 0 reports (one curve per trial)
                "report": not self.multi and (fold is None or fold == 0),
                "fold": fold,
            }
            out.append(f"++{self.callback_key}={render(callback)}")
        if self.tags_key:
            out.append(f"++{self.tags_key}.optuna_study={render(self.study_name)}")
            out.append(f"++{self.tags_key}.optuna_trial={trial.number}")
            if fold is not None:
                out.append(f"++{self.tags_key}.optuna_fold={fold}")
            if self._baseline(trial):
                out.append(f"++{self.tags_key}.baseline={render('true')}")  # a str tag
        return out

    def _finish(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        from tumorseg.sweep.runs import LIVE_TRIALS

        values = outcome.values if outcome.state == TrialState.COMPLETE else None
        if values is not None and len(values) != len(self.directions):
            reason = f"job returned {len(values)} values for {len(self.directions)} directions"
            outcome, values = Outcome(TrialState.FAIL, reason=reason), None
        if outcome.state == TrialState.FAIL:
            trial.set_user_attr("fail_reason", outcome.reason[:2000])
        stderr = self._record_stderr(trial, outcome) if values is not None else None
        state = None if values is not None else outcome.state
        try:
            done = study.tell(trial, values, state=state, skip_if_finished=True)
        except RuntimeError as err:  # grid and brute-force samplers call study.stop() when done
            if "Study.stop" not in str(err):
                raise
            self.exhausted = True
            done = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if self.heartbeat is not None:
            self.heartbeat.remove(trial._trial_id)
        LIVE_TRIALS.pop((study.study_name, trial.number), None)
        if done.state == TrialState.COMPLETE:
            shown = ", ".join(f"{v:.4f}" for v in done.values)
            if stderr is not None and not self.multi:
                shown += f" ± {stderr:.4f}"
            shown = ": " + shown + (" (baseline)" if self._baseline(done) else "")
        else:
            shown = f" ({outcome.reason})"
        log.info("trial %d %s%s", trial.number, done.state.name, shown)
        if self.runs is not None:
            self._guard(f"MLflow tags of trial {trial.number}", self._mark_runs, done)

    def _record_stderr(self, trial: optuna.Trial, outcome: Outcome) -> Any:
        """The standard error of the objective (a list for several), as user attr ``stderr``;
        None where the job did not tell."""
        stderrs = outcome.stderrs or [None] * len(outcome.values)
        stderr = stderrs if self.multi else stderrs[0]
        if stderr is not None and any(e is not None for e in stderrs):
            trial.set_user_attr("stderr", stderr)
            return stderr
        return None

    def _mark_runs(self, trial: FrozenTrial) -> None:
        """MLflow: the trial's state on its run (with folds, on the trial run the sweeper made
        and on each fold's run), its standard error as metric ``objective_stderr``."""
        attrs = trial.user_attrs
        if self.folds:
            self.runs.end_trial_run(attrs.get("mlflow_run_id"), trial)
            for key, run_id in attrs.items():
                if key.startswith("mlflow_run_id.fold"):
                    self.runs.mark(trial.number, trial.state, run_id)
            return
        self.runs.mark(trial.number, trial.state, attrs.get("mlflow_run_id"))
        self.runs.log_stderr(attrs.get("mlflow_run_id"), attrs.get("stderr"))

    def _abandon(
        self, study: optuna.Study, trials: Iterable[optuna.Trial], err: BaseException
    ) -> None:
        """FAIL the trials still running when the sweep itself stops (Ctrl-C, a job's exit)."""
        for trial in trials:
            self._finish(study, trial, Outcome(TrialState.FAIL, reason=f"sweep stopped: {err!r}"))

    # --- jobs in flight: a new one as soon as a slot is free ---------------------------------

    def _runner(self, basic: bool, pool: DevicePool | None) -> Any:
        """What runs the jobs: fresh processes (basic launcher, several at once, on devices of
        the pool, or trainers that start DDP ranks), the sweeper's own process (basic, one at
        a time), else one launcher call per job in a thread of its own."""
        if basic and (pool is not None or self.n_jobs > 1 or self._starts_ranks()):
            if self.storage is None:
                log.warning("trials in other processes with in-memory storage: nothing is pruned")
            args = (self.hydra_context, self.config, self.task_function, self.n_jobs, pool)
            return JobProcesses(*args, self.devices_key)
        if basic:
            return InlineJobs(self.launcher)
        return LauncherThreads(self.launcher, self.n_jobs)

    def _run_jobs(self, study: optuna.Study, runner: Any) -> None:
        """Keep ``n_jobs`` jobs (trials, or folds of trials) running until the study is full.
        With ``schedule=batch``, jobs start only when none runs: each batch waits for its
        slowest job (the old behaviour, kept for comparison)."""
        queued: list[Job] = []  # jobs of reserved trials, not started yet
        trials: dict[int, TrialJobs] = {}
        try:
            while True:
                if self.schedule == "async" or not runner.running:
                    while runner.can_start() and (job := self._next_job(study, queued, trials)):
                        self.clock.start(job.key)
                        devices = runner.start(job.key, job.number, job.overrides)
                        if devices:
                            job.trial.set_user_attr("devices", ",".join(devices))
                if not runner.running:
                    return
                for key, result in runner.wait():
                    self.clock.end(key)
                    self._job_ended(study, trials, queued, key, outcome_of(result.get))
        except BaseException as err:
            runner.stop()
            self._abandon(study, [t.trial for t in trials.values() if not t.told], err)
            raise

    def _next_job(
        self, study: optuna.Study, queued: list["Job"], trials: dict[int, "TrialJobs"]
    ) -> "Job | None":
        if not queued:
            reserved = self._reserve(study)
            if not reserved:
                return None
            trial = reserved[0]
            folds = list(range(self.folds)) if self.folds else [None]
            trials[trial.number] = TrialJobs(trial, len(folds))
            queued.extend(self._jobs_of(trial, folds))
        job = queued.pop(0)
        trials[job.trial.number].running += 1
        return job

    def _job_ended(
        self,
        study: optuna.Study,
        trials: dict[int, "TrialJobs"],
        queued: list["Job"],
        key: tuple[int, int | None],
        outcome: Outcome,
    ) -> None:
        number, fold = key
        entry = trials[number]
        entry.running -= 1
        if not entry.told:
            if fold is not None:
                self._fold_ended(entry, fold, outcome)
            if outcome.state != TrialState.COMPLETE:  # a pruned or failed fold ends its trial
                queued[:] = [j for j in queued if j.trial.number != number]
                entry.told = True
                self._finish(study, entry.trial, outcome)
            elif fold is None:
                entry.told = True
                self._finish(study, entry.trial, outcome)
            elif len(entry.outcomes) == entry.expected:
                entry.told = True
                self._finish(study, entry.trial, fold_outcome(entry.outcomes))
        if entry.told and entry.running == 0:
            del trials[number]

    def _fold_ended(self, entry: "TrialJobs", fold: int, outcome: Outcome) -> None:
        """Record fold ``fold``'s value(s) on the trial (user attr ``fold_values``)."""
        if outcome.state != TrialState.COMPLETE:
            log.info("trial %d, fold %d %s", entry.trial.number, fold, outcome.state.name)
            return
        entry.outcomes.append(outcome)
        entry.fold_values[str(fold)] = outcome.values if self.multi else outcome.value
        entry.trial.set_user_attr("fold_values", dict(entry.fold_values))

    def _jobs_of(self, trial: optuna.Trial, folds: list[int | None]) -> list["Job"]:
        """The jobs of ``trial``: one, or one per fold (job number trial x folds + fold)."""
        parent = self.runs.parent_id if self.runs else None
        if folds != [None] and self.runs is not None:
            parent = self._guard(
                "MLflow trial run", self.runs.trial_run, trial.number, self._baseline(trial)
            )
            if parent:
                trial.set_user_attr("mlflow_run_id", parent)
        jobs = []
        for fold in folds:
            overrides = self._job_overrides(trial, fold, parent)
            number = trial.number if fold is None else trial.number * len(folds) + fold
            jobs.append(Job(trial, fold, number, overrides))
        return jobs

    # --- results -------------------------------------------------------------------------------

    def _sweep_stats(self) -> dict[str, Any]:
        """This sweep's schedule, slots, wall and job time, and slot utilisation: job time /
        (slots x wall time), see :class:`.jobs.SlotClock`."""
        clock = self.clock
        if clock is None or not clock.spans:
            return {"schedule": self.schedule, "slots": self.n_jobs, "utilisation": None}
        utilisation = clock.utilisation()
        return {
            "schedule": self.schedule,
            "slots": clock.slots,
            "jobs": len(clock.spans),
            "wall_s": round(clock.wall(), 3),
            "job_s": round(sum(e - b for b, e in clock.spans), 3),
            "utilisation": None if utilisation is None else round(utilisation, 4),
        }

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        from tumorseg.sweep.runs import pareto_table, results

        sweep = self._sweep_stats()
        summary = results(study, self.label, sweep)
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        best = "no trial completed"
        if "best_trial" in summary:
            best = f"best trial {summary['best_trial']}: {summary['best_value']:.4f}"
            if summary.get("best_stderr") is not None:
                best += f" ± {summary['best_stderr']:.4f}"
            best += f" with {summary['best_params']}"
            best += f"; within its noise (one standard error): trials {summary['within_noise']}"
        elif "best_trials" in summary:
            table = {"directions": summary["direction"], "best_trials": summary["best_trials"]}
            best = f"Pareto front of {len(summary['best_trials'])} trials:\n{pareto_table(table)}"
        if sweep["utilisation"] is not None:
            log.info(
                "%s schedule: slot utilisation %.2f (%d jobs, %.1f s of jobs in %d slots x %.1f s)",
                self.schedule,
                sweep["utilisation"],
                sweep["jobs"],
                sweep["job_s"],
                sweep["slots"],
                sweep["wall_s"],
            )
        log.info("study %s: %s; %s", self.study_name, summary["states"], best)
        if self.runs is not None:
            self._guard("MLflow summary", self.runs.summarize, study, sweep)

    @staticmethod
    def _guard(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """MLflow bookkeeping must not stop a sweep: log and go on."""
        try:
            return fn(*args)
        except Exception as err:
            log.warning("%s failed: %s: %s", what, type(err).__name__, err)
            return None
