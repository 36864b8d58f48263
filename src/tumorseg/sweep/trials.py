"""A sweep's trials as jobs: how each job ended, a trial's folds, and keeping every slot busy.

A trial is one job, or with K-fold cross-validation K jobs (:class:`Job`, one per fold). A job
that returns a number (a :class:`tumorseg.sweep.objective.Score` carries its standard error), or
a list of them for a study of several objectives, is COMPLETE; one that raises
:class:`optuna.TrialPruned` is PRUNED; any other exception, or no finite value, is FAIL
(:func:`outcome_of`). A trial's folds give its value as their mean, its standard error their
spread (:func:`fold_outcome`); a pruned or failed fold ends its trial.

:func:`run_jobs` keeps ``n_jobs`` jobs in flight on a runner (:mod:`.runners`): a new one starts
as soon as any ends (``schedule=async``), or ``n_jobs`` at a time, each batch waiting for its
slowest (``schedule=batch``). :class:`SlotClock` measures how busy the slots were.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import ListConfig
from optuna.trial import FrozenTrial, TrialState

from tumorseg.sweep.objective import fold_mean, stderr_of
from tumorseg.sweep.runners import JobFailed

log = logging.getLogger(__name__)

# the states of trials that count towards n_trials
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def taken(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards ``n_trials``: all but waiting ones and failures that a retry
    replaced."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [
        t
        for t in trials
        if t.state in TAKEN and not (t.state == TrialState.FAIL and t.number in retried)
    ]


def is_baseline(trial: optuna.Trial | FrozenTrial) -> bool:
    """Whether ``trial`` is (a retry of) the baseline: the config as given."""
    return bool(trial.user_attrs.get("baseline"))


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


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def outcome_of(job: Callable[[], Any]) -> Outcome:
    """Run ``job`` (returning the job's value) and classify how it ended. A job returns a
    number (a :class:`tumorseg.sweep.objective.Score` carries its standard error) or a list of them,
    one per objective."""
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
    means = [fold_mean([o.values[i] for o in outcomes]) for i in range(len(outcomes[0].values))]
    return Outcome(
        TrialState.COMPLETE, values=[float(m) for m in means], stderrs=[m.stderr for m in means]
    )


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
    outcomes: list[Outcome] = field(default_factory=list)
    fold_values: dict[str, Any] = field(default_factory=dict)

    def ended(self, fold: int | None, outcome: Outcome, multi: bool = False) -> Outcome | None:
        """One of the trial's jobs ended: the trial's outcome once this decides it (its only
        job ended, a fold was pruned or failed, or the last fold completed), else None."""
        self.running -= 1
        if self.told:
            return None
        if fold is not None:
            self._fold_ended(fold, outcome, multi)
        if outcome.state != TrialState.COMPLETE or fold is None:
            self.told = True
            return outcome
        if len(self.outcomes) == self.expected:
            self.told = True
            return fold_outcome(self.outcomes)
        return None

    def _fold_ended(self, fold: int, outcome: Outcome, multi: bool) -> None:
        """Record fold ``fold``'s value(s) on the trial (user attr ``fold_values``)."""
        if outcome.state != TrialState.COMPLETE:
            log.info("trial %d, fold %d %s", self.trial.number, fold, outcome.state.name)
            return
        self.outcomes.append(outcome)
        self.fold_values[str(fold)] = outcome.values if multi else outcome.value
        self.trial.set_user_attr("fold_values", dict(self.fold_values))


@dataclass
class SlotClock:
    """When each job of a sweep started and ended, for its slot utilisation: job time over
    slot time, i.e. sum of job durations / (slots x wall time from the first start to the last
    end). A job's duration runs from its launch to its result reaching the sweeper."""

    slots: int
    started: dict[Any, float] = field(default_factory=dict)
    spans: list[tuple[float, float]] = field(default_factory=list)

    def start(self, key: Any) -> None:
        self.started[key] = time.monotonic()

    def end(self, key: Any) -> float:
        """Record the end of job ``key``; its duration in seconds."""
        begin = self.started.pop(key)
        self.spans.append((begin, time.monotonic()))
        return self.spans[-1][1] - begin

    def wall(self) -> float:
        if not self.spans:
            return 0.0
        return max(e for _, e in self.spans) - min(b for b, _ in self.spans)

    def utilisation(self) -> float | None:
        wall = self.wall()
        if wall <= 0:
            return None
        return sum(e - b for b, e in self.spans) / (self.slots * wall)

    def stats(self, schedule: str, slots: int) -> dict[str, Any]:
        """The sweep's schedule, slots, wall and job time, and slot utilisation (``slots``:
        those asked for, where no job ran)."""
        if not self.spans:
            return {"schedule": schedule, "slots": slots, "utilisation": None}
        utilisation = self.utilisation()
        return {
            "schedule": schedule,
            "slots": self.slots,
            "jobs": len(self.spans),
            "wall_s": round(self.wall(), 3),
            "job_s": round(sum(e - b for b, e in self.spans), 3),
            "utilisation": None if utilisation is None else round(utilisation, 4),
        }


def run_jobs(
    runner: Any,
    clock: SlotClock,
    reserve: Callable[[], list[Job]],
    finish: Callable[[optuna.Trial, Outcome], None],
    schedule: str = "async",
    multi: bool = False,
) -> None:
    """Keep ``runner``'s slots busy with jobs (trials, or folds of trials) until the study is
    full: ``reserve()`` gives the jobs of one more trial (none: the study is full),
    ``finish(trial, outcome)`` tells a trial's outcome once its jobs decided it. With
    ``schedule=batch``, jobs start only when none runs: each batch waits for its slowest job
    (the old behaviour, kept for comparison). When the sweep itself stops (Ctrl-C, a job's
    exit), the trials still running end FAIL."""
    queued: list[Job] = []  # jobs of reserved trials, not started yet
    trials: dict[int, TrialJobs] = {}

    def next_job() -> Job | None:
        if not queued:
            jobs = reserve()
            if not jobs:
                return None
            trials[jobs[0].trial.number] = TrialJobs(jobs[0].trial, len(jobs))
            queued.extend(jobs)
        job = queued.pop(0)
        trials[job.trial.number].running += 1
        return job

    try:
        while True:
            if schedule == "async" or not runner.running:
                while runner.can_start() and (job := next_job()):
                    clock.start(job.key)
                    devices = runner.start(job.key, job.number, job.overrides)
                    if devices:
                        job.trial.set_user_attr("devices", ",".join(devices))
            if not runner.running:
                return
            for key, result in runner.wait():
                clock.end(key)
                number, fold = key
                entry = trials[number]
                outcome = entry.ended(fold, outcome_of(result.get), multi)
                if outcome is not None:
                    if outcome.state != TrialState.COMPLETE:  # no more folds of this trial
                        queued[:] = [j for j in queued if j.trial.number != number]
                    finish(entry.trial, outcome)
                if entry.told and entry.running == 0:
                    del trials[number]
    except BaseException as err:
        runner.stop()
        for entry in trials.values():
            if not entry.told:
                finish(entry.trial, Outcome(TrialState.FAIL, reason=f"sweep stopped: {err!r}"))
        raise
