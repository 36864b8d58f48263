"""How a sweep's Hydra jobs run: in fresh processes on devices of the pool, or through a launcher.

:class:`JobProcesses` runs each Hydra job in a fresh spawned process (as Hydra's basic launcher
would run it in-process), with ``CUDA_VISIBLE_DEVICES`` and ``TUMORSEG_DEVICES``
(:data:`.pool.POOL_ENV`) set to the job's devices from a :class:`.pool.DevicePool` before the
process starts, so CUDA in the job sees only those devices, and ``++trainer.devices=<how many>``
added to its overrides, so the trainer uses all of them (with ``trainer=ddp``, one DDP process
per device). A job's devices go back to the pool when its process has exited, however it ended.
One fresh process per job: CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process, and a job that
runs out of memory or is killed takes only itself down.

Hydra's launchers take a list of jobs and return when the last one ends. To keep every slot
busy, :class:`LauncherThreads` gives each job its own call ``launcher.launch([overrides],
initial_job_idx=number)`` in a thread of its own: one joblib task, one submitit job (a local
process or a SLURM job, which submitit polls) per call, ``n_jobs`` calls at once. The launchers
keep no state between calls but the sweep folder, so concurrent calls do not disturb each other.
:class:`InlineJobs` runs one job at a time in the sweeper's own process (Hydra's basic launcher).

All three have one interface (``can_start``, ``start``, ``running``, ``wait``, ``stop``), which
the Optuna sweeper's scheduling loop (:func:`.trials.run_jobs`) drives; :func:`run_multirun` runs
a plain multirun's jobs on the pool (the ``tumorseg_pool`` launcher). Nothing heavy is imported
here, as Hydra's plugin scan imports it through the plugins at every start.
"""

import contextlib
import logging
import multiprocessing
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from tumorseg.core.processes import exit_with_parent
from tumorseg.sweep.pool import POOL_ENV, DevicePool, jobs_at_once, pool_devices

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """What a job process sends back: the job's return value, or its exception."""

    value: Any = None
    error: BaseException | None = None  # the job's exception, where it survives pickling
    error_text: str = ""  # "Type: message"; set whenever the job raised

    def get(self) -> Any:
        """The value, or the job's exception raised again."""
        if self.error_text:
            raise self.error if self.error is not None else JobFailed(self.error_text)
        return self.value


class JobFailed(Exception):
    """A job failed with an exception that could not be sent back; the message says which."""


@dataclass
class Running:
    key: Any
    number: int
    process: Any
    conn: Connection
    devices: tuple[str, ...]
    started: float = field(default_factory=time.time)
    result: JobResult | None = None


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _job_process(payload: str, number: int, overrides: list[str], conn: Connection, threads: int):
    """Run one Hydra job, as the basic launcher would, and send its result back as
    ``(value, error, error_text)`` (plain types: the sweeper makes its :class:`JobResult`)."""
    import cloudpickle

    exit_with_parent(os.getppid(), f"job {number}")  # a job whose sweeper died stops too
    with open(payload, "rb") as f:
        context, config, task, singletons = cloudpickle.load(f)
    torch = __import__("sys").modules.get("torch")  # share the cores between parallel jobs
    if torch is not None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals
    from omegaconf import open_dict

    value, error, text = None, None, ""
    try:
        setup_globals()
        Singleton.set_state(singletons)
        job_cfg = context.config_loader.load_sweep_config(config, overrides)
        with open_dict(job_cfg):
            job_cfg.hydra.job.id = number
            job_cfg.hydra.job.num = number
        HydraConfig.instance().set_config(job_cfg)
        ret = run_job(
            hydra_context=context,
            task_function=task,
            config=job_cfg,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status == JobStatus.FAILED:
            raise ret._return_value
        value = ret.return_value
    except BaseException as err:  # noqa: BLE001 - everything goes back to the sweeper
        error, text = err, f"{type(err).__name__}: {err}"
    try:
        conn.send((value, error, text))
    except Exception:  # the value or the exception does not pickle
        conn.send((None, None, text or f"job returned an unpicklable {type(value).__name__}"))
    conn.close()


class JobProcesses:
    """Up to ``n_jobs`` Hydra jobs at once, each in a fresh process, on devices from ``pool``."""

    def __init__(
        self,
        hydra_context: Any,
        config: Any,
        task_function: Any,
        n_jobs: int,
        pool: DevicePool | None = None,
        devices_key: str | None = "trainer.devices",
    ) -> None:
        import cloudpickle
        from hydra.core.singleton import Singleton

        # by value: hydra.main() hides the task function behind its wrapper of the same name.
        # Through a file: a large argument would block start() until the child has imported
        # torch and reads it
        fd, self.payload = tempfile.mkstemp(prefix="tumorseg-jobs-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            cloudpickle.dump((hydra_context, config, task_function, Singleton.get_state()), f)
        self.n_jobs, self.pool, self.devices_key = n_jobs, pool, devices_key
        self.threads = max(1, (os.cpu_count() or 1) // n_jobs)
        self.ctx = multiprocessing.get_context("spawn")
        self.running: list[Running] = []

    def can_start(self) -> bool:
        """A slot is free (fewer than n_jobs running and, with a pool, devices free)."""
        return len(self.running) < self.n_jobs and (self.pool is None or self.pool.available())

    def start(self, key: Any, number: int, overrides: list[str]) -> tuple[str, ...]:
        """Start job ``number`` (``key`` comes back with its result); returns its devices."""
        devices = self.pool.acquire() if self.pool is not None else ()
        env = {}
        if devices:
            env = {"CUDA_VISIBLE_DEVICES": ",".join(devices), POOL_ENV: ",".join(devices)}
            if self.devices_key:
                overrides = [*overrides, f"++{self.devices_key}={len(devices)}"]
        recv, send = self.ctx.Pipe(duplex=False)
        try:
            args = (self.payload, number, overrides, send, self.threads)
            process = self.ctx.Process(target=_job_process, args=args, name=f"job-{number}")
            with _environ(env):  # the spawned interpreter starts with the job's devices
                process.start()
        except BaseException:
            if self.pool is not None:
                self.pool.release(devices)
            raise
        finally:
            send.close()
        self.running.append(Running(key, number, process, recv, devices))
        if devices:
            log.info("job %d on devices %s", number, ",".join(devices))
        return devices

    def wait(self) -> list[tuple[Any, JobResult]]:
        """Block until at least one job's process has ended; their keys and results."""
        if not self.running:
            return []
        handles = [r.conn for r in self.running] + [r.process.sentinel for r in self.running]
        wait_ready(handles)
        done = []
        for r in list(self.running):
            if r.result is None and r.conn.poll():
                try:
                    value, error, text = r.conn.recv()
                    r.result = JobResult(value, error, text)
                except (EOFError, OSError):  # died without a word
                    r.result = None
                    r.process.join()
            if r.result is None and r.process.is_alive():
                continue
            r.process.join()  # the job sent its result and exits: its devices are free after
            result = r.result or JobResult(
                error_text=f"job process died (exit code {r.process.exitcode})"
            )
            self._end(r)
            done.append((r.key, result))
        return done

    def stop(self) -> list[Any]:
        """Terminate every running job (the sweep itself stops); their keys."""
        keys = []
        for r in list(self.running):
            if r.process.is_alive():
                r.process.terminate()
            r.process.join(30)
            if r.process.is_alive():
                r.process.kill()
                r.process.join()
            self._end(r)
            keys.append(r.key)
        return keys

    def close(self) -> None:
        """Stop what still runs and remove the payload file."""
        self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.payload)

    def __enter__(self) -> "JobProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end(self, r: Running) -> None:
        r.conn.close()
        self.running.remove(r)
        if self.pool is not None:
            self.pool.release(r.devices)


# --- jobs through a Hydra launcher ----------------------------------------------------------


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


# --- a plain multirun on the pool ------------------------------------------------------------


def run_multirun(
    hydra_context: Any,
    config: Any,
    task_function: Any,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    n_jobs: int | None = None,
    devices: Any = "auto",
    per_job: int = 1,
    devices_key: str | None = "trainer.devices",
) -> list[JobResult]:
    """Run a multirun's jobs ``n_jobs`` at a time (by default one per device set of the pool),
    each in a fresh process on its own devices of the pool ``devices``; their results, in the
    order of ``job_overrides``."""
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    accelerator = OmegaConf.select(config, "trainer.accelerator", default="auto")
    found = pool_devices(devices, accelerator)
    pool = DevicePool(found, per_job) if found else None
    n_jobs = jobs_at_once(n_jobs, pool)
    where = f" on devices {pool.devices}, {pool.per_job} per job" if pool else ""
    log.info(f"Launching {len(job_overrides)} jobs, {n_jobs} at a time{where}")
    if n_jobs > 1:  # as the TrackingStore callback does, for configs without it
        from tumorseg.sweep.launch import prepare_tracking

        prepare_tracking(config)
    args = (hydra_context, config, task_function, n_jobs, pool)
    pending = list(enumerate(job_overrides))
    results: dict[int, JobResult] = {}
    with JobProcesses(*args, devices_key) as jobs:
        while pending or jobs.running:
            while pending and jobs.can_start():
                idx, overrides = pending.pop(0)
                shown = " ".join(filter_overrides(overrides))
                log.info(f"\t#{initial_job_idx + idx} : {shown}")
                jobs.start(idx, initial_job_idx + idx, list(overrides))
            for idx, result in jobs.wait():
                results[idx] = result
    return [results[idx] for idx in range(len(job_overrides))]
