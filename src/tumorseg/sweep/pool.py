"""The device pool of parallel sweeps: disjoint sets of devices for the jobs running at once.

A pool spec (``hydra.sweeper.devices``, ``hydra.launcher.devices``) is ``auto`` (every visible
GPU), a list of indices or ``null`` (no pool). :class:`DevicePool` hands each running job its own
``per_job`` of them; the job's process starts with ``CUDA_VISIBLE_DEVICES`` and
:data:`POOL_ENV` set to them (:mod:`.runners`), and :func:`tumorseg.sweep.launch.devices_tag`
reports the latter as the run's ``devices`` tag.

Imports nothing heavy (torch only for ``auto`` without ``CUDA_VISIBLE_DEVICES``): Hydra's plugin
scan imports it through the plugins at every start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from hydra.errors import HydraException

POOL_ENV = "TUMORSEG_DEVICES"  # a pooled job's devices, readable on any machine


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


def pool_devices(spec: Any, accelerator: Any) -> list[str]:
    """The devices of a pool spec for jobs whose trainer runs on ``accelerator``: none for
    ``null``, nor for ``auto`` when that is the CPU."""
    if spec is None or (spec == "auto" and str(accelerator) == "cpu"):
        return []
    return visible_devices(spec)


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


def jobs_at_once(n_jobs: int | None, pool: DevicePool | None) -> int:
    """Jobs to run at once: ``n_jobs`` (by default one per device set of the pool, else 1),
    at most one per device set."""
    if pool is None:
        return n_jobs or 1
    return min(n_jobs or pool.slots, pool.slots)
