"""The ``tumorseg_optuna`` sweeper: an Optuna study (ask and tell) whose trials are Hydra jobs.

Each trial's job gets the sampled values as overrides, plus ``++callbacks.optuna_pruning=...``
(per-epoch reports and pruning, see :mod:`tumorseg.sweep`) and ``++tags.optuna_study/trial``.
A job that returns a number is COMPLETE; one that raises :class:`optuna.TrialPruned` is PRUNED;
any other exception, or no finite value, is FAIL with the reason in user attr ``fail_reason``,
and the sweep goes on.

``n_trials`` is the size of the study, not of this run: a rerun (or a second worker on the same
storage) only runs what is missing, counting finished and running trials. ``n_jobs > 1`` with
Hydra's basic launcher runs that many trials at once, each in a spawned process that runs the
Hydra job as the launcher would; with another launcher (joblib, submitit) trials go to it in
batches of ``n_jobs``.

Heavy imports (torch, lightning, mlflow via :mod:`tumorseg.sweep`) happen inside ``sweep``, so
Hydra's plugin scan at every start stays cheap. No ``from __future__ import annotations``: Hydra's
scan runs this module before it is in ``sys.modules``, where string annotations break dataclasses.
"""

import logging
import math
import multiprocessing
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Quote, QuotedString, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.tumorseg_optuna_sweeper.config import OptunaSweeperConf

log = logging.getLogger(__name__)
__all__ = ["OptunaSweeper", "OptunaSweeperConf"]
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


@dataclass
class Outcome:
    """How a trial's job ended."""

    state: TrialState
    value: float | None = None
    reason: str = ""


def outcome_of(job: Callable[[], Any]) -> Outcome:
    """Run ``job`` (returning the job's value) and classify how it ended."""
    try:
        value = job()
    except optuna.TrialPruned as err:
        return Outcome(TrialState.PRUNED, reason=str(err))
    except Exception as err:
        log.warning("job failed", exc_info=err)
        return Outcome(TrialState.FAIL, reason=f"{type(err).__name__}: {err}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return Outcome(TrialState.FAIL, reason=f"job returned {value!r}, not a finite number")
    return Outcome(TrialState.COMPLETE, value=float(value))


def job_value(ret: JobReturn) -> Any:
    """The job's return value, or its exception raised (without Hydra's "Error executing job"
    line, which would be wrong for a pruned trial)."""
    if ret.status == JobStatus.FAILED:
        raise ret._return_value
    return ret.return_value


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


# --- trials in spawned processes (n_jobs > 1 with the basic launcher) -----------------------

# Hydra's plugin scan re-runs this module in every new Plugins instance (each job's
# Singleton.set_state): keep the worker's state across those re-runs
_WORKER: dict[str, Any] = globals().get("_WORKER", {})


def _init_worker(payload: bytes, threads: int) -> None:
    import cloudpickle

    keys = ("context", "config", "task", "singletons")
    _WORKER.update(zip(keys, cloudpickle.loads(payload), strict=True))
    torch = sys.modules.get("torch")  # share the cores between the trials running at once
    if torch is not None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)


def _run_in_worker(number: int, overrides: list[str]) -> Outcome:
    """One Hydra job as the basic launcher runs it, in this worker process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    def job() -> Any:
        setup_globals()
        Singleton.set_state(_WORKER["singletons"])
        context: HydraContext = _WORKER["context"]
        config = context.config_loader.load_sweep_config(_WORKER["config"], overrides)
        with open_dict(config):
            config.hydra.job.id = number
            config.hydra.job.num = number
        HydraConfig.instance().set_config(config)
        ret = run_job(
            hydra_context=context,
            task_function=_WORKER["task"],
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        return job_value(ret)

    return outcome_of(job)


@contextmanager
def _init_lock(storage: str | None) -> Iterator[None]:
    """Serialise study and MLflow set-up of workers sharing one SQLite file (fresh databases
    cannot be created by two processes at once)."""
    from tumorseg.sweep import sqlite_path

    path = sqlite_path(storage)
    try:
        import fcntl
    except ImportError:  # not POSIX
        path = None
    if path is None:
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


class OptunaSweeper(Sweeper):
    """Runs ``n_trials`` Hydra jobs in all as trials of an Optuna study (see the module doc)."""

    def __init__(
        self,
        params: DictConfig | None = None,
        direction: str = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        storage: str | None = None,
        study_name: str | None = None,
        sampler: DictConfig | None = None,
        pruner: DictConfig | None = None,
        monitor: str = "val/dice_mean",
        callback: str | None = "tumorseg.sweep.OptunaPruning",
        callback_key: str = "callbacks.optuna_pruning",
        tags_key: str | None = "tags",
        mlflow: bool = True,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise HydraException(f"hydra.sweeper.direction: maximize or minimize, not {direction}")
        if n_jobs < 1 or n_trials < 0:
            raise HydraException("hydra.sweeper: n_jobs must be >= 1 and n_trials >= 0")
        self.params = OmegaConf.to_container(params, resolve=True) if params else {}
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.storage, self.study_name = storage or None, study_name
        self.sampler_cfg = OmegaConf.to_container(sampler, resolve=True) if sampler else {}
        self.pruner_cfg = OmegaConf.to_container(pruner, resolve=True) if pruner else {}
        self.monitor, self.callback, self.callback_key = monitor, callback, callback_key
        self.tags_key, self.use_mlflow = tags_key, mlflow
        self.space: dict[str, BaseDistribution] = {}
        self.fixed: list[str] = []
        self.runs: Any = None  # tumorseg.sweep.StudyRuns when MLflow is on
        self.exhausted = False  # the sampler has nothing left to try
        self.label = ""

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
        from tumorseg.sweep import absolute_url, storage_label

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

        with _init_lock(self.storage):
            study = self._open_study()
            self.runs = self._guard("MLflow set-up", self._open_runs)
            self._fail_stale(study)
        before = {t.number for t in study.get_trials(deepcopy=False)}
        log.info(
            "study %s (%s): %d trials of %d, %d to run, %d at a time; space %s",
            self.study_name,
            self.label,
            len(study.get_trials(deepcopy=False, states=TAKEN)),
            self.n_trials,
            self._todo(study),
            self.n_jobs,
            list(self.space),
        )
        try:
            if self.n_jobs > 1 and type(self.launcher).__name__ == "BasicLauncher":
                self._run_pool(study)
            else:
                self._run_batches(study)
        finally:
            self._report(study, sweep_dir)
        return [t for t in study.get_trials() if t.number not in before]

    def _open_study(self) -> optuna.Study:
        from tumorseg.sweep import open_storage

        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            direction=self.direction,
            pruner=instantiate(self.pruner_cfg) if self.pruner_cfg else None,
            load_if_exists=True,
        )
        if study.direction.name.lower() != self.direction:
            raise HydraException(
                f"study {self.study_name} in {self.label} is {study.direction.name.lower()}d, "
                f"not {self.direction}d: pick another study_name"
            )
        # a resumed study must not replay the sampler's first draws: seed + trials so far
        sampler_cfg = dict(self.sampler_cfg)
        if sampler_cfg.get("seed") is not None:
            sampler_cfg["seed"] = int(sampler_cfg["seed"]) + len(study.get_trials(deepcopy=False))
        if sampler_cfg:
            study.sampler = instantiate(sampler_cfg)
        return study

    def _fail_stale(self, study: optuna.Study) -> None:
        """FAIL running trials whose sweeper process on this machine is gone (killed sweeps)."""
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            if where == host and pid.isdigit() and not _alive(int(pid)):
                reason = f"stale: its sweeper (pid {pid} on {host}) ended while it ran"
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                log.warning("trial %d: %s", t.number, reason)
                if self.runs is not None:
                    self._guard("MLflow tag", self.runs.mark, t.number, TrialState.FAIL)

    def _open_runs(self) -> Any:
        from tumorseg.sweep import StudyRuns

        mlflow_cfg = OmegaConf.select(self.config, "logger.mlflow")
        if not self.use_mlflow or not mlflow_cfg:
            return None
        mlflow_cfg = OmegaConf.to_container(mlflow_cfg, resolve=True)
        return StudyRuns.open(mlflow_cfg, self.study_name, self.label)

    def _todo(self, study: optuna.Study) -> int:
        if self.exhausted:
            return 0
        return self.n_trials - len(study.get_trials(deepcopy=False, states=TAKEN))

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        from tumorseg.sweep import LIVE_TRIALS

        trial = study.ask(self.space)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("sweep_dir", str(self.config.hydra.sweep.dir))
        if self.storage is None:
            LIVE_TRIALS[(study.study_name, trial.number)] = trial
        return trial

    def _job_overrides(self, trial: optuna.Trial) -> list[str]:
        out = [*self.fixed, *(sampled_override(k, v) for k, v in trial.params.items())]
        if self.callback:
            callback = {
                "_target_": self.callback,
                "study_name": self.study_name,
                "trial_number": trial.number,
                "storage": self.storage,
                "pruner": self.pruner_cfg or None,
                "monitor": self.monitor,
                "parent_run_id": self.runs.parent_id if self.runs else None,
            }
            out.append(f"++{self.callback_key}={render(callback)}")
        if self.tags_key:
            out.append(f"++{self.tags_key}.optuna_study={render(self.study_name)}")
            out.append(f"++{self.tags_key}.optuna_trial={trial.number}")
        return out

    def _finish(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        from tumorseg.sweep import LIVE_TRIALS

        if outcome.state == TrialState.FAIL:
            trial.set_user_attr("fail_reason", outcome.reason[:2000])
        values = outcome.value if outcome.state == TrialState.COMPLETE else None
        state = None if values is not None else outcome.state
        try:
            done = study.tell(trial, values, state=state, skip_if_finished=True)
        except RuntimeError as err:  # grid and brute-force samplers call study.stop() when done
            if "Study.stop" not in str(err):
                raise
            self.exhausted = True
            done = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        LIVE_TRIALS.pop((study.study_name, trial.number), None)
        log.info(
            "trial %d %s%s",
            trial.number,
            done.state.name,
            f": {done.value:.4f}" if done.state == TrialState.COMPLETE else f" ({outcome.reason})",
        )
        if self.runs is not None:
            self._guard(
                f"MLflow tag of trial {trial.number}", self.runs.mark, trial.number, done.state
            )

    def _abandon(
        self, study: optuna.Study, trials: Iterable[optuna.Trial], err: BaseException
    ) -> None:
        """FAIL the trials still running when the sweep itself stops (Ctrl-C, a job's exit)."""
        for trial in trials:
            self._finish(study, trial, Outcome(TrialState.FAIL, reason=f"sweep stopped: {err!r}"))

    # --- one at a time, or batches through another launcher ----------------------------------

    def _run_batches(self, study: optuna.Study) -> None:
        while (todo := self._todo(study)) > 0:
            trials = [self._ask(study) for _ in range(min(todo, self.n_jobs))]
            try:
                outcomes = self._launch(trials)
            except BaseException as err:  # KeyboardInterrupt, SystemExit from the job
                self._abandon(study, trials, err)
                raise
            for trial, outcome in zip(trials, outcomes, strict=True):
                self._finish(study, trial, outcome)

    def _launch(self, trials: list[optuna.Trial]) -> list[Outcome]:
        jobs = [self._job_overrides(t) for t in trials]
        try:
            returns = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
        except Exception as err:  # the batch did not compose (bad override)
            return [Outcome(TrialState.FAIL, reason=f"{type(err).__name__}: {err}")] * len(trials)
        return [outcome_of(lambda r=r: job_value(r)) for r in returns]

    # --- n_jobs processes ----------------------------------------------------------------------

    def _run_pool(self, study: optuna.Study) -> None:
        if self.storage is None:
            log.warning("n_jobs > 1 with in-memory storage: trials run, but nothing is pruned")
        while self._todo(study) > 0:
            self._pool_round(study)

    def _new_pool(self) -> ProcessPoolExecutor:
        import cloudpickle
        from hydra.core.singleton import Singleton

        # by value: hydra.main() hides the task function behind its wrapper of the same name
        payload = cloudpickle.dumps(
            (self.hydra_context, self.config, self.task_function, Singleton.get_state())
        )
        threads = max(1, (os.cpu_count() or 1) // self.n_jobs)
        return ProcessPoolExecutor(
            self.n_jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(payload, threads),
        )

    def _pool_round(self, study: optuna.Study) -> None:
        """Keep n_jobs trials running until the study is full, or until a worker process dies
        (killed for memory, say): then its trials FAIL and the caller starts a fresh pool."""
        running: dict[Future, optuna.Trial] = {}
        broken = False
        with self._new_pool() as pool:
            try:
                while True:
                    while not broken and len(running) < self.n_jobs and self._todo(study) > 0:
                        trial = self._ask(study)
                        job = pool.submit(_run_in_worker, trial.number, self._job_overrides(trial))
                        running[job] = trial
                    if not running:
                        return
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for job in done:
                        try:
                            outcome = job.result()
                        except BrokenProcessPool as err:
                            broken = True
                            outcome = Outcome(TrialState.FAIL, reason=f"worker process died: {err}")
                        self._finish(study, running[job], outcome)
                        del running[job]
            except BaseException as err:
                self._abandon(study, running.values(), err)
                raise

    # --- results -------------------------------------------------------------------------------

    def _report(self, study: optuna.Study, sweep_dir: Path) -> None:
        from tumorseg.sweep import results

        summary = results(study, self.label)
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        best = "no trial completed"
        if "best_trial" in summary:
            best = f"best trial {summary['best_trial']}: {summary['best_value']:.4f}"
            best += f" with {summary['best_params']}"
        log.info("study %s: %s; %s", self.study_name, summary["states"], best)
        if self.runs is not None:
            self._guard("MLflow summary", self.runs.summarize, study)

    @staticmethod
    def _guard(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """MLflow bookkeeping must not stop a sweep: log and go on."""
        try:
            return fn(*args)
        except Exception as err:
            log.warning("%s failed: %s: %s", what, type(err).__name__, err)
            return None
