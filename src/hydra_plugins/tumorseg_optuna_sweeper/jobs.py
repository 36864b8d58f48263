"""Jobs in flight through any Hydra launcher: a new job starts as soon as one slot is free.

Hydra's launchers take a list of jobs and return when the last one ends. To keep every slot
busy, :class:`LauncherThreads` gives each job its own call ``launcher.launch([overrides],
initial_job_idx=number)`` in a thread of its own: one joblib task, one submitit job (a local
process or a SLURM job, which submitit polls) per call, ``n_jobs`` calls at once. The launchers
keep no state between calls but the sweep folder, so concurrent calls do not disturb each other.
:class:`InlineJobs` runs one job at a time in the sweeper's own process (Hydra's basic launcher).

Both have the interface of :class:`.pool.JobProcesses` (``can_start``, ``start``, ``running``,
``wait``, ``stop``); :class:`SlotClock` measures how busy the slots were.
"""

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger(__name__)


@dataclass
class Returned:
    """One job's end as a launcher reports it: its ``JobReturn``, or the launcher's error."""

    ret: JobReturn | None = None
    error: BaseException | None = None

    def get(self) -> Any:
        """The job's return value, or its exception raised (without Hydra's "Error executing
        job" line, which would be wrong for a pruned trial)."""
        if self.error is not None:
            raise self.error
        if self.ret.status == JobStatus.FAILED:
            raise self.ret._return_value
        return self.ret.return_value


def _launch_one(launcher: Any, number: int, overrides: Sequence[str]) -> Returned:
    try:
        (ret,) = launcher.launch([list(overrides)], initial_job_idx=number)
    except Exception as err:  # the job did not compose (bad override), or submitit failed
        return Returned(error=err)
    return Returned(ret)


class LauncherThreads:
    """Up to ``n_jobs`` jobs at once, each one launcher call in a thread of its own."""

    def __init__(self, launcher: Any, n_jobs: int) -> None:
        self.launcher, self.n_jobs = launcher, n_jobs
        self.threads: dict[Any, threading.Thread] = {}
        self.done: queue.Queue = queue.Queue()

    @property
    def running(self) -> list[Any]:
        return list(self.threads)

    def can_start(self) -> bool:
        return len(self.threads) < self.n_jobs

    def start(self, key: Any, number: int, overrides: list[str]) -> tuple[str, ...]:
        def run() -> None:
            try:
                result = _launch_one(self.launcher, number, overrides)
            except BaseException as err:  # noqa: BLE001 - the sweeper decides what it means
                result = Returned(error=err)
            self.done.put((key, result))

        thread = threading.Thread(target=run, name=f"job-{number}", daemon=True)
        self.threads[key] = thread
        thread.start()
        return ()

    def wait(self) -> list[tuple[Any, Returned]]:
        """Block until at least one job has ended; their keys and results."""
        if not self.threads:
            return []
        while True:
            try:  # a timeout, so that Ctrl-C gets through
                ended = [self.done.get(timeout=1.0)]
                break
            except queue.Empty:
                continue
        while True:
            try:
                ended.append(self.done.get_nowait())
            except queue.Empty:
                break
        for key, _ in ended:
            self.threads.pop(key).join()
        return ended

    def stop(self) -> list[Any]:
        """The sweep stops: forget the running jobs (a launcher call cannot be interrupted; a
        submitit job goes on until it ends or its time limit)."""
        keys = list(self.threads)
        if keys:
            log.warning("%d jobs still run in the launcher; their trials end FAIL", len(keys))
        self.threads.clear()
        return keys

    def __enter__(self) -> "LauncherThreads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InlineJobs:
    """One job at a time, run by the launcher (Hydra's basic one: in this process) on ``wait``."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher
        self.queued: list[tuple[Any, int, list[str]]] = []

    @property
    def running(self) -> list[Any]:
        return [key for key, _, _ in self.queued]

    def can_start(self) -> bool:
        return not self.queued

    def start(self, key: Any, number: int, overrides: list[str]) -> tuple[str, ...]:
        self.queued.append((key, number, overrides))
        return ()

    def wait(self) -> list[tuple[Any, Returned]]:
        if not self.queued:
            return []
        key, number, overrides = self.queued.pop()
        return [(key, _launch_one(self.launcher, number, overrides))]

    def stop(self) -> list[Any]:
        keys, self.queued = self.running, []
        return keys

    def __enter__(self) -> "InlineJobs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
