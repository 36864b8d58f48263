"""An Optuna study (ask and tell) whose trials are Hydra jobs: what the ``tumorseg_optuna``
sweeper runs (``hydra_plugins/tumorseg_optuna_sweeper`` is its Hydra shell).

Each trial's job gets the sampled values as overrides, plus ``++callbacks.optuna_pruning=...``
(per-epoch reports and pruning, see :mod:`tumorseg.sweep.runs`) and ``++tags.optuna_study/trial``.
How a job's end becomes the trial's state (COMPLETE, PRUNED, FAIL with user attr
``fail_reason``): :mod:`.trials`; the sweep goes on after a failure.

Trial 0 of a new study is the baseline: the config as given, no sampled values (its params:
the config's own values where they lie in the search space, :func:`.space.baseline_params`).
With ``folds=K`` each trial runs K jobs (``data.fold=k``) and its value is their mean, its
standard error their spread; only fold 0 reports to the pruner. Several objectives: no pruning;
the summary shows the Pareto front. Single objective: it lists the trials within one standard
error of the best.

``n_trials`` is the size of the study, not of this run: a rerun (or a second worker on the same
storage) only runs what is missing, counting finished and running trials. A trial is reserved
(the study counted and the trial created) under the study's lock, so workers sharing a storage
never run more than ``n_trials`` between them. ``n_jobs`` jobs are in flight at once
(:func:`.trials.run_jobs`): with Hydra's basic launcher each in a fresh spawned process on its
own devices of the pool (:mod:`.pool`, :class:`.runners.JobProcesses`), with another launcher
(joblib, submitit) each one launcher call in a thread of its own
(:class:`.runners.LauncherThreads`). Each sweep reports its slot utilisation. Trials whose
trainer starts DDP ranks by re-running the command line (``trainer=ddp`` on several devices) run
in fresh processes even one at a time: when a rank fails, Lightning SIGKILLs the process that
started the ranks, which must be the trial's, not the sweeper's.

Workers on other machines: with ``heartbeat_interval`` set, this sweeper records a heartbeat for
each trial it runs, and fails the trials of workers that stopped beating for ``grace_period``
(killed, machine lost), retrying each up to ``max_retry`` times and ending its MLflow run
FAILED (:mod:`.liveness`). A worker whose own trials are done waits for such trials before it
exits.

Heavy imports (torch, lightning, mlflow via :mod:`tumorseg.sweep.runs`) happen inside
:meth:`StudySweep.run`, so Hydra's plugin scan at every start stays cheap.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tumorseg.sweep.liveness import (
    Heartbeat,
    fail_dead_local,
    fail_unbeating,
    queue_retry,
    worker_name,
)
from tumorseg.sweep.pool import DevicePool, jobs_at_once, pool_devices
from tumorseg.sweep.runners import InlineJobs, JobProcesses, LauncherThreads
from tumorseg.sweep.space import baseline_params, render, sampled_override, search_space
from tumorseg.sweep.trials import (
    Job,
    Outcome,
    SlotClock,
    is_baseline,
    run_jobs,
    taken,
)

log = logging.getLogger(__name__)


@contextmanager
def study_lock(storage: str | None) -> Iterator[None]:
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


class StudySweep:
    """Runs ``n_trials`` Hydra jobs in all as trials of an Optuna study (see the module doc).

    Takes the settings of ``hydra.sweeper`` (the ``tumorseg_optuna`` sweeper's config) as plain
    values; :meth:`setup` takes the composed config and what runs its jobs, :meth:`run` the
    sweep's overrides."""

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        direction: Any = "maximize",
        n_trials: int = 20,
        n_jobs: int | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        sampler: Mapping[str, Any] | None = None,
        pruner: Mapping[str, Any] | None = None,
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
        if (n_jobs is not None and n_jobs < 1) or n_trials < 0 or devices_per_trial < 1:
            raise HydraException(
                "hydra.sweeper: n_jobs and devices_per_trial must be >= 1 and n_trials >= 0"
            )
        self.directions = [str(d) for d in directions]
        self.schedule, self.folds, self.fold_key, self.folds_key = (
            schedule,
            folds,
            fold_key,
            folds_key,
        )
        self.baseline = baseline
        self.params = _plain(params) or {}
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.storage, self.study_name = storage or None, study_name
        self.sampler_cfg = _plain(sampler) or {}
        self.pruner_cfg = _plain(pruner) or {}
        self.monitor, self.callback, self.callback_key = monitor, callback, callback_key
        self.tags_key, self.use_mlflow = tags_key, mlflow
        self.devices, self.devices_per_trial, self.devices_key = (
            _plain(devices),
            devices_per_trial,
            devices_key,
        )
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.max_retry = max_retry
        self.heartbeat: Heartbeat | None = None
        self.space: dict[str, BaseDistribution] = {}
        self.fixed: list[str] = []
        self.runs: Any = None  # tumorseg.sweep.runs.StudyRuns when MLflow is on
        self.exhausted = False  # the sampler has nothing left to try
        self.label = ""
        self.clock: SlotClock | None = None
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None
        self.launcher: Any = None

    @property
    def multi(self) -> bool:
        """Several objectives: a multi-objective study, without pruning."""
        return len(self.directions) > 1

    def setup(
        self,
        config: DictConfig,
        hydra_context: Any = None,
        task_function: Any = None,
        launcher: Any = None,
    ) -> None:
        """The multirun's composed config (``hydra.*`` included) and what runs its jobs: Hydra's
        context and task function (for jobs in processes of this sweep) and its launcher."""
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.launcher = launcher
        self.study_name = self.study_name or str(config.hydra.job.name)

    # --- the sweep ---------------------------------------------------------------------------

    def run(self, overrides: list[Override]) -> list[FrozenTrial]:
        """Run the study's missing trials over the search space of ``overrides`` (the sweep's
        ``params`` and command line, parsed); the trials this run added."""
        from tumorseg.sweep.runs import absolute_url, storage_label

        self.storage = absolute_url(self.storage)
        self.space, self.fixed = search_space(overrides)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # also fixes ${now:} for every job
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self.label = storage_label(self.storage, str(sweep_dir))
        basic = type(self.launcher).__name__ == "BasicLauncher"
        pool = self.device_pool(basic)
        self.n_jobs = self.jobs_at_once(pool)

        with study_lock(self.storage):
            study = self._open_study()
            self.runs = self._guard("MLflow set-up", self._open_runs)
            self.fail_stale(study)
            if self.baseline and not study.get_trials(deepcopy=False):
                self._enqueue_baseline(study)
        before = {t.number for t in study.get_trials(deepcopy=False)}
        log.info(
            "study %s (%s): %d trials of %d, %d to run, %d at a time%s; space %s",
            self.study_name,
            self.label,
            len(taken(study)),
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
            self.heartbeat = Heartbeat(study._storage, self.heartbeat_interval)
        self.clock = SlotClock(self.n_jobs)
        try:
            while True:
                with self._runner(basic, pool) as runner:
                    run_jobs(
                        runner,
                        self.clock,
                        functools.partial(self._reserve_jobs, study),
                        functools.partial(self._finish, study),
                        self.schedule,
                        self.multi,
                    )
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

    def device_pool(self, basic: bool) -> DevicePool | None:
        """The pool of ``devices`` (``auto``: every visible GPU, for jobs not on the CPU);
        ``basic``: the jobs run through Hydra's basic launcher, else a launcher that places
        them itself (no pool)."""
        if self.devices is None:
            return None
        accelerator = OmegaConf.select(self.config, "trainer.accelerator", default="auto")
        devices = pool_devices(self.devices, accelerator)
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

    def jobs_at_once(self, pool: DevicePool | None) -> int:
        """``n_jobs``, by default one per device set of the pool (else 1)."""
        if pool is not None and self.n_jobs is not None and self.n_jobs > pool.slots:
            log.warning(
                "n_jobs=%d, but %d devices hold only %d trials of %d devices: %d at a time",
                self.n_jobs,
                len(pool.devices),
                pool.slots,
                pool.per_job,
                pool.slots,
            )
        return jobs_at_once(self.n_jobs, pool)

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

    # --- trials whose worker died ------------------------------------------------------------

    def fail_stale(self, study: optuna.Study, local: bool = True) -> None:
        """FAIL running trials whose sweeper is gone: with ``local``, those of this machine
        whose sweeper process has ended; with heartbeats, any not beating for
        ``grace_period``."""
        on_stale = functools.partial(self._on_stale, study)
        if local:
            fail_dead_local(study, on_stale)
        if self.heartbeat_interval and self.storage:
            grace = self.grace_period or 2 * self.heartbeat_interval
            fail_unbeating(study, grace, on_stale)

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial failed because its worker died: queue a retry with the same params (up to
        ``max_retry``) and end its MLflow run FAILED."""
        queue_retry(study, trial, self.max_retry)
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
        self.fail_stale(study, local=False)  # as on a cluster: the heartbeat alone decides
        return True

    def _open_runs(self) -> Any:
        from tumorseg.sweep.runs import StudyRuns

        mlflow_cfg = OmegaConf.select(self.config, "logger.mlflow")
        if not self.use_mlflow or not mlflow_cfg:
            return None
        mlflow_cfg = OmegaConf.to_container(mlflow_cfg, resolve=True)
        return StudyRuns.open(mlflow_cfg, self.study_name, self.label)

    # --- trials: reserve, ask, tell ------------------------------------------------------------

    def _todo(self, study: optuna.Study) -> int:
        if self.exhausted:
            return 0
        return self.n_trials - len(taken(study))

    def _reserve(self, study: optuna.Study, most: int = 1) -> list[optuna.Trial]:
        """Up to ``most`` new trials, as many as the study still lacks. Counting and creating
        happen under the study's lock: two workers that both saw the study one trial short
        would otherwise each create one."""
        with study_lock(self.storage):
            return [self._ask(study) for _ in range(min(most, self._todo(study)))]

    def _reserve_jobs(self, study: optuna.Study) -> list[Job]:
        """The jobs of one new trial (none where the study is full): one, or one per fold."""
        reserved = self._reserve(study)
        if not reserved:
            return []
        folds = list(range(self.folds)) if self.folds else [None]
        return self._jobs_of(reserved[0], folds)

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        from tumorseg.sweep.runs import LIVE_TRIALS

        space = self.space
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting and is_baseline(waiting[0]):  # ask takes the oldest waiting trial
            fits, _ = baseline_params(self.config, self.space)
            space = {k: d for k, d in self.space.items() if k in fits}
        with warnings.catch_warnings():  # heartbeats are ours here, not Study.optimize's
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            trial = study.ask(space)
        trial.set_user_attr("worker", worker_name())
        trial.set_user_attr("sweep_dir", str(self.config.hydra.sweep.dir))
        if self.heartbeat is not None:
            self.heartbeat.add(trial._trial_id)
        if self.storage is None:
            LIVE_TRIALS[(study.study_name, trial.number)] = trial
        return trial

    def _enqueue_baseline(self, study: optuna.Study) -> None:
        """Trial 0 of a new study: the config as given, without sampled values."""
        fits, misfits = baseline_params(self.config, self.space)
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

    def _jobs_of(self, trial: optuna.Trial, folds: list[int | None]) -> list[Job]:
        """The jobs of ``trial``: one, or one per fold (job number trial x folds + fold)."""
        parent = self.runs.parent_id if self.runs else None
        if folds != [None] and self.runs is not None:
            parent = self._guard(
                "MLflow trial run", self.runs.trial_run, trial.number, is_baseline(trial)
            )
            if parent:
                trial.set_user_attr("mlflow_run_id", parent)
        jobs = []
        for fold in folds:
            overrides = self._job_overrides(trial, fold, parent)
            number = trial.number if fold is None else trial.number * len(folds) + fold
            jobs.append(Job(trial, fold, number, overrides))
        return jobs

    def _job_overrides(
        self, trial: optuna.Trial, fold: int | None = None, parent: str | None = None
    ) -> list[str]:
        """The job's overrides: the fixed ones, the sampled values (none for the baseline),
        the pruning callback, MLflow tags and, for a fold, ``data.fold``/``data.folds``."""
        out = list(self.fixed)
        if not is_baseline(trial):
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
            if is_baseline(trial):
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
            shown = ": " + shown + (" (baseline)" if is_baseline(done) else "")
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

    # --- results -------------------------------------------------------------------------------

    def _sweep_stats(self) -> dict[str, Any]:
        """This sweep's schedule, slots, wall and job time, and slot utilisation: job time /
        (slots x wall time), see :class:`.trials.SlotClock`."""
        if self.clock is None:
            return {"schedule": self.schedule, "slots": self.n_jobs, "utilisation": None}
        return self.clock.stats(self.schedule, self.n_jobs)

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


def _plain(value: Any) -> Any:
    """An OmegaConf container as plain dicts and lists (resolved); anything else as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
