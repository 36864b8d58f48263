"""Where a run's time went: a recorder of named phases, printed as one table at the end of a run
and logged to MLflow as ``time/<phase>`` metrics.

``train.run`` opens a ``Phases`` (``begin()``), wraps its own steps in ``phase("name")``,
and the data module, the callbacks and the compile hook add their parts to the active recorder
(``active()``), so that no phase needs its owner passed around. The phases, in seconds:

* ``startup``: imports, config composition, building the data module, model, logger and trainer
  (everything before the first phase below that is not one of them);
* ``demo``: generating the demo cases (``data=demo`` only, once);
* ``prepare``: packing raw cases into the slice store (once per data set and preprocessing);
* ``train``: the fit loop's training batches, checkpoints included;
* ``validation``: the validation loops inside fit;
* ``compile``: ``torch.compile`` tracing and code generation (``model.compile``);
* ``test``: the test stage (the kept checkpoint on the test cases, scored case by case);
* ``logging``: MLflow params, config, data sets, artifacts, preview and the run's model;
* ``other``: the rest of the wall time (the recorder's own total less the phases).

``total`` is the wall time from the process start (or from ``Phases()``, for a run inside a
longer process) to the table; the phases add up to it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PHASES = ("startup", "demo", "prepare", "train", "validation", "compile", "test", "logging")
METRIC_PREFIX = "time/"

_active: list[Phases] = []
_runs = 0  # runs begun in this process


def process_start() -> float | None:
    """The ``time.time()`` at which this process started (Linux ``/proc``), or None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime, clock ticks after boot (field 22)
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def compile_seconds() -> float:
    """Seconds this process has spent in ``torch.compile`` so far (TorchDynamo's own count of
    whole-frame and backward compiles); 0 where torch does not count it."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:  # nothing compiled: do not import dynamo to learn it
        return 0.0
    try:
        return float(utils.calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # an internal API: a torch without it counts nothing
        return 0.0


class Phases:
    """Wall seconds per phase of one run.

    ``since`` is the ``time.time()`` the run's total counts from: by default the process start
    (so that ``startup`` holds the imports), else now. Phases nest: a phase timed inside another
    (``logging`` in a callback during ``train``) counts for itself only, not for the outer one;
    time ``torch.compile`` spends inside any phase counts as ``compile``.
    """

    def __init__(self, since: float | None = None, from_process_start: bool = True) -> None:
        start = since if since is not None else (process_start() if from_process_start else None)
        now = time.time()
        self.since = start if start is not None and start <= now else now
        self.seconds: dict[str, float] = {}
        self.total: float | None = None
        self._open: list[list] = []  # [name, start, compile at start, children s, children compile]

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    def start(self, name: str) -> None:
        """Open phase ``name`` (closed by ``stop``; ``__call__`` is the block form)."""
        self._open.append([name, time.perf_counter(), compile_seconds(), 0.0, 0.0])

    def stop(self, name: str) -> None:
        """Close the innermost open phase, which must be ``name``; nothing if none is open."""
        if not self._open or self._open[-1][0] != name:
            return
        _, start, compiled, children, children_compile = self._open.pop()
        took = time.perf_counter() - start
        compiling = compile_seconds() - compiled
        own_compile = max(0.0, compiling - children_compile)
        self.add(name, took - children - own_compile)
        if own_compile > 0:
            self.add("compile", own_compile)
        if self._open:
            self._open[-1][3] += took
            self._open[-1][4] += compiling

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def startup_done(self) -> None:
        """Mark the end of start-up: the time since ``since`` not in another phase so far."""
        elapsed = time.time() - self.since
        self.add("startup", elapsed - sum(self.seconds.values()))

    def finish(self) -> dict[str, float]:
        """Close the run: every phase of ``PHASES`` (0 when it did not happen), then any other
        phase recorded, ``other`` (the total less the phases) and ``total``."""
        self.total = time.time() - self.since
        out = {name: self.seconds.get(name, 0.0) for name in PHASES}
        for name, value in self.seconds.items():
            out.setdefault(name, value)
        out["other"] = max(0.0, self.total - sum(out.values()))
        out["total"] = self.total
        return out

    def metrics(self, values: dict[str, float] | None = None) -> dict[str, float]:
        """``time/<phase>`` metrics of ``finish()``'s values."""
        values = values if values is not None else self.finish()
        return {f"{METRIC_PREFIX}{k}": round(v, 3) for k, v in values.items()}


def table(values: dict[str, float]) -> str:
    """Phases as a console table: seconds and share of the total."""
    total = values.get("total") or sum(v for k, v in values.items() if k != "total") or 1.0
    width = max(len(k) for k in values)
    lines = [f"{'phase':<{width}}  {'s':>8}  {'%':>5}"]
    for name, value in values.items():
        if name == "total":
            continue
        lines.append(f"{name:<{width}}  {value:8.1f}  {100 * value / total:5.1f}")
    lines.append(f"{'total':<{width}}  {total:8.1f}  {100.0:5.1f}")
    return "\n".join(lines)


def begin(phases: Phases | None = None) -> Phases:
    """Make ``phases`` the active recorder, in place of any earlier one (a run that raised
    leaves its own behind). By default a new one counting from the process start for the
    process's first run, from now for later ones (the jobs of a sweep in one process)."""
    global _runs
    if phases is None:
        phases = Phases(from_process_start=_runs == 0)
    _runs += 1
    _active[:] = [phases]
    return phases


def end() -> None:
    """No active recorder any more."""
    _active.clear()


def active() -> Phases | None:
    """The recorder of the run in progress, or None outside one."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name`` in the active recorder; nothing outside a run."""
    phases = active()
    if phases is None:
        yield
        return
    with phases(name):
        yield


def timed(name: str) -> Callable[[F], F]:
    """Decorator: each call of the function is phase ``name`` of the active recorder."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
