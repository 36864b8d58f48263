"""Scoring a segmented case against its reference, and summaries over cases.

Per case and BraTS region (WT, TC, ET): Dice, IoU, pixel accuracy (``acc``), sensitivity
(``sens``), specificity (``spec``) and HD95 in mm (from the voxel spacing). These short names
are the CSV columns and the MLflow metric names everywhere (``test/dice_wt``,
``case/hd95_et``). Used by ``tumorseg-evaluate``, the training test stage and reports.

Empty-mask rules (as BraTS), for each region:

* Dice, IoU: both masks empty -> 1; exactly one empty -> 0.
* HD95: both empty -> 0; exactly one empty -> 373.13 mm (the diagonal of a BraTS volume).
* Sensitivity: empty reference -> 1 if the prediction is empty too, else 0.
* Specificity: reference covering the whole volume (no negatives) -> 1.

HD95 pools the surface distances of both directions (prediction -> reference and reference ->
prediction) and takes their 95th percentile, as MedPy's ``hd95`` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage

from tumorseg.labels import REGIONS
from tumorseg.outputs import write_atomically

if TYPE_CHECKING:
    from mlflow import MlflowClient

METRICS = ("dice", "iou", "acc", "sens", "spec", "hd95")
COLUMNS = ("case_id", "region", *METRICS)
EMPTY_HD95 = 373.13  # mm, diagonal of the 240 x 240 x 155 BraTS volume at 1 mm
HD95_MARGIN = 1  # voxels of padding around the masks' bounding box (enough for the erosion)
RESAMPLES, SEED = 2000, 0  # bootstrap of the mean

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- metrics


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box padded by ``margin`` voxels (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        start = max(int(hits[0]) - margin, 0)
        stop = min(int(hits[-1]) + 1 + margin, mask.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its binary erosion (face connectivity)."""
    return mask & ~ndimage.binary_erosion(mask)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th percentile Hausdorff distance (mm) between boolean masks.

    Distances from each surface voxel of one mask to the nearest surface voxel of the other, in
    both directions, pooled; computed on the masks' padded bounding box, which holds every
    surface voxel, so the result equals the one on the full volume.
    """
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return EMPTY_HD95
    box = bounding_box(pred | ref, HD95_MARGIN)
    pred_surface, ref_surface = surface(pred[box]), surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All of ``METRICS`` for two boolean masks (empty-mask rules in the module docstring)."""
    tp = np.count_nonzero(pred & ref)
    fp = np.count_nonzero(pred) - tp
    fn = np.count_nonzero(ref) - tp
    tn = pred.size - tp - fp - fn
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "acc": (tp + tn) / pred.size,
        "sens": tp / (tp + fn) if tp + fn else float(fp == 0),
        "spec": tn / (tn + fp) if tn + fp else 1.0,
        "hd95": hd95(pred, ref, spacing),
    }


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
) -> dict[str, dict[str, float]]:
    """Metrics of one case: region (``wt``, ``tc``, ``et``) -> metric -> value.

    ``pred`` and ``ref`` are canonical label volumes (0 background, 1 NCR, 2 ED, 3 ET) of the
    same shape; ``spacing`` is the voxel size in mm along each axis (used for HD95).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ref.ndim}D volume")
    out = {}
    for region, labels in REGIONS.items():
        out[region] = {
            name: float(value)
            for name, value in mask_metrics(
                np.isin(pred, labels), np.isin(ref, labels), spacing
            ).items()
        }
    return out


# ---------------------------------------------------------------- summary


def bootstrap_ci(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile 95% CI of the mean from ``resamples`` seeded bootstrap resamples."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    low, high = np.percentile(values[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def summarise(df: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Per metric and region of a per-case table: n, mean, median, std (ddof 1), 95% CI.

    ``df`` has the columns of ``metrics.csv``; the result has one row per metric and region
    (in ``METRICS`` and ``REGIONS`` order) and columns metric, region, n, mean, median, std,
    ci_low, ci_high. Each group's bootstrap uses the same ``seed``.
    """
    rows = []
    for metric in METRICS:
        for region in REGIONS:
            values = df.loc[df["region"] == region, metric].dropna().to_numpy(dtype=float)
            if not len(values):
                continue
            low, high = bootstrap_ci(values, resamples, seed)
            rows.append(
                {
                    "metric": metric,
                    "region": region,
                    "n": len(values),
                    "mean": values.mean(),
                    "median": float(np.median(values)),
                    "std": values.std(ddof=1) if len(values) > 1 else float("nan"),
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return pd.DataFrame(rows)


def means_table(summary: pd.DataFrame) -> str:
    """Compact text table of the means: one row per region, one column per metric."""
    means = summary.pivot(index="region", columns="metric", values="mean")
    means = means.reindex(index=[r for r in REGIONS if r in means.index], columns=list(METRICS))
    lines = ["region " + " ".join(f"{m:>11}" for m in METRICS)]
    for region, row in means.iterrows():
        lines.append(f"{region.upper():<6} " + " ".join(f"{v:>11.4f}" for v in row))
    return "\n".join(lines)


def save_boxplot(df: pd.DataFrame, path: Path) -> None:
    """Box plot of Dice and HD95 per region, one panel each, as PNG."""
    # imported here: seaborn and matplotlib are slow to import and only needed for this plot
    import seaborn as sns
    from matplotlib.figure import Figure

    data = df.assign(region=df["region"].str.upper())
    order = [r.upper() for r in REGIONS]
    fig = Figure(figsize=(9, 4), layout="constrained")
    for ax, metric, title in zip(
        fig.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)"), strict=True
    ):
        sns.boxplot(data=data, x="region", y=metric, order=order, ax=ax, color="lightsteelblue")
        sns.stripplot(data=data, x="region", y=metric, order=order, ax=ax, color="0.2", size=3)
        ax.set(title=title, xlabel="", ylabel=title)
    fig.suptitle(f"{df['case_id'].nunique()} cases")
    fig.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------- tables and files


def case_rows(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing) -> list[dict]:
    """Rows of the per-case table (one per region) for one case."""
    return [
        {"case_id": case_id, "region": r, **m} for r, m in case_metrics(pred, ref, spacing).items()
    ]


def case_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def case_means(df: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """``{"test/dice_wt": mean over cases, ..., "test/dice_mean": mean over regions}``."""
    means = df.groupby("region")[list(METRICS)].mean()
    out = {}
    for m in METRICS:
        out.update({f"{prefix}/{m}_{r}": float(means.loc[r, m]) for r in means.index})
        out[f"{prefix}/{m}_mean"] = float(means[m].mean())
    return out


def output_paths(output: Path) -> dict[str, Path]:
    """The three output files: per-case CSV, summary CSV and box plot, side by side."""
    return {
        "metrics": output,
        "summary": output.with_name(f"{output.stem}_summary.csv"),
        "boxplot": output.with_name(f"{output.stem}_boxplot.png"),
    }


def write_outputs(df: pd.DataFrame, summary: pd.DataFrame, paths: dict[str, Path]) -> None:
    write_atomically(
        [
            (paths["metrics"], lambda p: df.to_csv(p, index=False)),
            (paths["summary"], lambda p: summary.to_csv(p, index=False)),
            (paths["boxplot"], lambda p: save_boxplot(df, p)),
        ]
    )


def log_to_mlflow(
    client: MlflowClient, run_id: str, summary: pd.DataFrame, paths: dict[str, Path]
) -> None:
    """Means as ``case/<metric>_<region>`` metrics and the output files as artifacts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"case/{row.metric}_{row.region}", float(row.mean), now, 0)
        for row in summary.itertuples()
    ]
    client.log_batch(run_id, metrics=metrics)
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
