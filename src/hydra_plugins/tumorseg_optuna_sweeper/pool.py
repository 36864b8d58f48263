"""Hydra jobs in parallel processes, each on its own devices: the device pool of parallel sweeps.

:class:`DevicePool` hands out disjoint sets of device indices. :class:`JobProcesses` runs each
Hydra job in a fresh spawned process (as Hydra's basic launcher would run it in-process), with
``CUDA_VISIBLE_DEVICES`` and ``TUMORSEG_DEVICES`` set to the job's devices before the process
starts, so CUDA in the job sees only those devices, and ``++trainer.devices=<how many>`` added to
its overrides, so the trainer uses all of them (with ``trainer=ddp``, one DDP process per
device). A job's devices go back to the pool when its process has exited, however it ended.

One fresh process per job: CUDA reads ``CUDA_VISIBLE_DEVICES`` once per process, and a job that
runs out of memory or is killed takes only itself down. The Optuna sweeper and the
``tumorseg_pool`` launcher (plain multiruns) both use this module; it imports nothing heavy, as
Hydra's plugin scan imports it at every start.
"""

import contextlib
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from typing import Any

from hydra.errors import HydraException

log = logging.getLogger(__name__)

POOL_ENV = "TUMORSEG_DEVICES"  # = tumorseg.sweep.launch.POOL_ENV (not imported: it pulls in torch)


def visible_devices(spec: Any) -> list[str]:
    """The devices a pool spec names: ``auto`` (every visible GPU: the entries of
    ``CUDA_VISIBLE_DEVICES`` when set, else ``0 .. n-1``), a list of indices, or ``null``
    (none). Indices stay strings, as ``CUDA_VISIBLE_DEVICES`` takes them (UUIDs too)."""
    if spec is None or spec == [] or spec == "":
        return []
    if spec == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [d.strip() for d in visible.split(",") if d.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(spec, (str, int)):
        spec = [s for s in str(spec).split(",") if s.strip()]
    devices = [str(d).strip() for d in spec]
    if len(set(devices)) != len(devices):
        raise HydraException(f"devices: {devices} lists a device twice")
    return devices


class DevicePool:
    """Disjoint sets of ``per_job`` devices out of ``devices``, for the jobs running at once."""

    def __init__(self, devices: Sequence[str], per_job: int = 1) -> None:
        if per_job < 1:
            raise HydraException(f"devices per job must be >= 1, not {per_job}")
        if len(devices) < per_job:
            raise HydraException(
                f"{per_job} devices per job, but the pool has {len(devices)}: {list(devices)}"
            )
        self.devices, self.per_job = list(devices), per_job
        self.free = list(devices)

    @property
    def slots(self) -> int:
        """How many jobs can hold devices at once."""
        return len(self.devices) // self.per_job

    def available(self) -> bool:
        return len(self.free) >= self.per_job

    def acquire(self) -> tuple[str, ...]:
        if not self.available():
            raise RuntimeError(f"no {self.per_job} free devices (free: {self.free})")
        taken, self.free = tuple(self.free[: self.per_job]), self.free[self.per_job :]
        return taken

    def release(self, devices: Sequence[str]) -> None:
        for device in devices:
            if device not in self.devices or device in self.free:
                raise RuntimeError(f"device {device} released twice or not from this pool")
        # back in pool order, so a released device is the next one handed out
        self.free = [d for d in self.devices if d in self.free or d in devices]


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


def _exit_with_parent(parent: int) -> None:
    """A job process whose sweeper died stops too, instead of training for no one."""
    while True:
        time.sleep(2)
        if os.getppid() != parent:
            log.error("sweeper (pid %d) is gone: stopping this job", parent)
            os._exit(1)


def _job_process(payload: str, number: int, overrides: list[str], conn: Connection, threads: int):
    """Run one Hydra job, as the basic launcher would, and send its result back as
    ``(value, error, error_text)`` (plain types: Hydra's plugin scan re-imports this module, so
    its classes are not the ones the sweeper unpickles)."""
    import cloudpickle

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
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
