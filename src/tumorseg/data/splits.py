"""Splitting a data set by patient: train / val / test, and the validation folds of
cross-validation. Deterministic for a seed; every slice of a patient stays in one split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tumorseg.core.errors import DataError

SPLITS = ("train", "val", "test")


def split_cases(
    case_ids: Sequence[str],
    val: float,
    test: float,
    seed: int,
    fold: int | None = None,
    folds: int = 5,
) -> dict[str, list[str]]:
    """Seeded split of patients into train/val/test; every case lands in exactly one split.

    The test cases are drawn first. Without ``fold``, ``val`` of the cases go to validation;
    with ``fold = k``, the other cases are dealt into ``folds`` folds and fold ``k`` validates.
    """
    n = len(case_ids)
    n_test = max(1, round(n * test)) if test > 0 else 0
    order = np.random.default_rng(seed).permutation(sorted(case_ids)).tolist()
    test_ids, rest = order[:n_test], order[n_test:]
    if fold is None:
        n_val = max(1, round(n * val))
        if n - n_test - n_val < 1:
            raise DataError(
                f"{n} cases are too few for val={val}, test={test} (need >= {n_val + n_test + 1})"
            )
        val_ids, train_ids = rest[:n_val], rest[n_val:]
    else:
        if folds < 2 or not 0 <= fold < folds:
            raise DataError(f"fold must be in 0..{folds - 1} with folds >= 2, got {fold}/{folds}")
        if len(rest) < folds:
            raise DataError(f"{n} cases are too few for {folds} folds after test={test}")
        parts = [p.tolist() for p in np.array_split(np.array(rest, dtype=object), folds)]
        val_ids = parts[fold]
        train_ids = [c for k, p in enumerate(parts) if k != fold for c in p]
    return {"test": sorted(test_ids), "val": sorted(val_ids), "train": sorted(train_ids)}


def kfold_cases(
    case_ids: Sequence[str], test: float, seed: int, folds: int
) -> dict[str, list[Any]]:
    """The held-out test cases and the ``folds`` validation folds of the rest."""
    parts = [split_cases(case_ids, 0.0, test, seed, k, folds)["val"] for k in range(folds)]
    return {"test": split_cases(case_ids, 0.0, test, seed, 0, folds)["test"], "folds": parts}
