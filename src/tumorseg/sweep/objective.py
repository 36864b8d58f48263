"""What a training job returns to a sweep: its objective value(s) and their noise.

A job returns a :class:`Score` (one objective) or a list of them (several, in the order of
``optimized_metric``). A ``Score`` is a ``float``, so code that compares or formats the value
keeps working; it also carries the standard error of that value (``stderr``: bootstrap over
validation patients for case-level metrics; ``None`` where the job cannot tell), which the
sweeper records on the trial. Torch-free: the sweeper imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class Score(float):
    """An objective value with its standard error (``None``: unknown) and metric name."""

    stderr: float | None
    metric: str

    def __new__(cls, value: float, stderr: float | None = None, metric: str = "") -> Score:
        self = super().__new__(cls, value)
        self.stderr = None if stderr is None or not math.isfinite(stderr) else float(stderr)
        self.metric = metric
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # pickles across the sweep's processes
        return (Score, (float(self), self.stderr, self.metric))

    def __repr__(self) -> str:
        se = "" if self.stderr is None else f" ± {self.stderr:.4f}"
        return f"Score({self.metric or 'value'}={float(self):.4f}{se})"


def stderr_of(value: Any) -> float | None:
    """The standard error a job attached to ``value`` (a ``Score``), else ``None``."""
    return getattr(value, "stderr", None)


def as_values(value: Any) -> list[float]:
    """A job's return value as a list of objective values (one per objective)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [float(v) for v in value]
    return [float(value)]


def fold_mean(scores: Sequence[float]) -> Score:
    """Mean over cross-validation folds; its standard error is the folds' spread
    (sample standard deviation / sqrt(K)), ``None`` for one fold."""
    k = len(scores)
    mean = sum(scores) / k
    if k < 2:
        return Score(mean, stderr_of(scores[0]))
    var = sum((s - mean) ** 2 for s in scores) / (k - 1)
    return Score(mean, math.sqrt(var / k), getattr(scores[0], "metric", ""))
