"""Scoring a segmented case against its reference, and summaries over cases.

Per case and region: Dice, IoU, pixel accuracy (``acc``), sensitivity (``sens``), specificity
(``spec``) and HD95 in mm (from the voxel spacing). These short names are the CSV columns and
the MLflow metric names everywhere (``test/dice_wt``, ``case/hd95_et``). Used by
``tumorseg-evaluate``, the training test stage and reports.

Regions are those of the label convention the volumes are in
(``tumorseg.core.labels.REGIONS_BY_CONVENTION``), in the order of ``REGION_ORDER``: WT, TC and ET,
then the single labels NETC (necrotic / non-enhancing core) and SNFH (edema), which every
convention has, and RC (resection cavity) only where the convention has a cavity label
(``brats2024``). A convention without a region gets no row for it. ``BRATS_REGIONS`` (WT, TC, ET)
are the ones averaged into ``*_mean``.

Empty-mask rules (as BraTS), for each region:

* Dice, IoU: both masks empty -> 1; exactly one empty -> 0.
* HD95: both empty -> 0; exactly one empty -> 373 mm (``EMPTY_HD95``).
* Sensitivity: empty reference -> 1 if the prediction is empty too, else 0.
* Specificity: reference covering the whole volume (no negatives) -> 1.

HD95 pools the surface distances of both directions (prediction -> reference and reference ->
prediction) and takes their 95th percentile, as MedPy's ``hd95`` does (``hd95="pooled"``, the
default and the official BraTS evaluator's); ``hd95="max"`` takes the larger of the two directed
95th percentiles, as MONAI does, and the HD95 columns are then named ``hd95_max``,
``lesion_hd95_max`` and ``penalised_hd95_max`` (so are the MLflow metrics). Whatever the
convention, the per-case and per-lesion CSVs carry it in a last column ``hd95_convention``
(``pooled`` or ``max``), and every MLflow run that gets HD95 metrics gets the tag
``hd95_convention`` (``HD95_TAG``); the bare names (``hd95``) stay the pooled ones, so CSVs
written before the column are read as they were.

Lesion-wise columns, NSD and their rules are ``tumorseg.evaluation.lesions``' (the official BraTS
evaluator's): ``nsd`` (global surface Dice), lesion counts ``lesions_ref``, ``lesions_pred``,
``matched``, ``missed``, ``false``, the official lesion-wise score ``lesion_dice``,
``lesion_nsd``, ``lesion_hd95`` (mean over matched lesions) and the BraTS 2023 score with
missed and false lesions as 0 / 373 mm, ``penalised_*``. NaN (no lesion on either side) stays
empty in the CSV. The per-lesion table (``<stem>_lesions.csv``) has one row per matched, missed
or false lesion.

Infinity, one rule: every HD95 written (CSV column, summary, MLflow metric) is finite. Where the
definition gives no finite distance (one mask empty; a missed or false lesion; no matched
lesion) it is 373 mm, ``tumorseg.evaluation.lesions.REPORTED_INF``, the value the official
reports write for an infinite global HD95 and count per missed or false lesion.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tumorseg.core.files import write_atomically
from tumorseg.core.labels import REGIONS, REGIONS_BY_CONVENTION, from_canonical, to_canonical
from tumorseg.data.preprocess import bounding_box
from tumorseg.evaluation.figures import save_region_boxplot
from tumorseg.evaluation.lesions import (
    REPORTED_INF,
    hd95_from,
    nearest_distances,
    reported,
    surface,
)
from tumorseg.evaluation.lesions import score_case as lesion_scores

if TYPE_CHECKING:
    from mlflow import MlflowClient

BASE_METRICS = ("dice", "iou", "acc", "sens", "spec", "hd95")  # case_metrics
LESION_METRICS = (
    "nsd",
    "lesions_ref",
    "lesions_pred",
    "matched",
    "missed",
    "false",
    "lesion_dice",
    "lesion_nsd",
    "lesion_hd95",
    "penalised_dice",
    "penalised_nsd",
    "penalised_hd95",
)
METRICS = BASE_METRICS + LESION_METRICS  # columns with the default (pooled) HD95
COLUMNS = ("case_id", "region", *METRICS)
LESION_COLUMNS = (
    "case_id",
    "region",
    "status",
    "ref_id",
    "pred_id",
    "ref_voxels",
    "pred_voxels",
    "volume_mm3",
    "centre_i",
    "centre_j",
    "centre_k",
    "dice",
    "nsd",
    "hd95",
)
HD95_CONVENTIONS = ("pooled", "max")
HD95_TAG = "hd95_convention"  # CSV column and MLflow tag naming the HD95 convention
REGION_ORDER = ("wt", "tc", "et", "netc", "snfh", "rc")  # rows, summaries and plots
BRATS_REGIONS = tuple(REGIONS)  # the regions ``*_mean`` averages, as BraTS ranks them
EMPTY_HD95 = REPORTED_INF  # mm, HD95 with exactly one mask empty: the one infinity rule
HD95_MARGIN = 1  # voxels of padding around the masks' bounding box (enough for the erosion)
RESAMPLES, SEED = 2000, 0  # bootstrap of the mean

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- regions


def regions_of(labels: str = "canonical") -> dict[str, tuple[int, ...]]:
    """Region -> label values of the label convention ``labels`` (a key of
    ``tumorseg.core.labels.REGIONS_BY_CONVENTION``; ``canonical`` is tumorseg's own), in
    ``REGION_ORDER``."""
    if labels not in REGIONS_BY_CONVENTION:
        raise ValueError(
            f"unknown label convention {labels!r}: use one of {sorted(REGIONS_BY_CONVENTION)}"
        )
    table = REGIONS_BY_CONVENTION[labels]
    return {r: table[r] for r in REGION_ORDER if r in table}


def ordered_regions(regions) -> list[str]:
    """The distinct ``regions`` in ``REGION_ORDER``, others after them, sorted."""
    present = set(regions)
    return [r for r in REGION_ORDER if r in present] + sorted(present - set(REGION_ORDER))


def in_convention(seg: np.ndarray, convention: str, target: str, source: str) -> np.ndarray:
    """``seg``, label values of ``convention``, as uint8 values of ``target``.

    Every value is checked (``LabelError`` naming ``source`` for one ``convention`` lacks). A
    label ``target`` has no value for becomes background (a cavity read into ``brats2020``)."""
    canonical = to_canonical(seg, convention, source)
    if convention == target:
        return seg.astype(np.uint8)
    return from_canonical(canonical, target)


# ---------------------------------------------------------------- metrics


def metric_names(hd95: str = "pooled") -> tuple[str, ...]:
    """The metric columns; HD95 columns carry the convention unless it is ``pooled``."""
    if hd95 not in HD95_CONVENTIONS:
        raise ValueError(f"unknown HD95 convention {hd95!r}: use one of {HD95_CONVENTIONS}")
    if hd95 == "pooled":
        return METRICS
    return tuple(f"{m}_{hd95}" if m.endswith("hd95") else m for m in METRICS)


def metrics_of(df: pd.DataFrame) -> list[str]:
    """The metric columns of a per-case table, in ``METRICS`` order, whatever the convention."""
    known = dict.fromkeys(name for c in HD95_CONVENTIONS for name in metric_names(c))
    return [m for m in known if m in df.columns]


def hd95(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], convention: str = "pooled"
) -> float:
    """Symmetric 95th percentile Hausdorff distance (mm) between boolean masks.

    Distances from each surface voxel of one mask to the nearest surface voxel of the other, in
    both directions, pooled (``convention="max"``: the larger directed 95th percentile);
    surfaces found in the masks' padded bounding box, distances between surface voxels with a
    k-d tree (``tumorseg.evaluation.lesions.nearest_distances``; equal to a distance transform's).
    """
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return EMPTY_HD95
    box = bounding_box(pred | ref, HD95_MARGIN)
    pred_points, ref_points = np.argwhere(surface(pred[box])), np.argwhere(surface(ref[box]))
    sampling = np.asarray(spacing, dtype=np.float64)
    d_ref = nearest_distances(ref_points, pred_points, sampling)
    d_pred = nearest_distances(pred_points, ref_points, sampling)
    return hd95_from(d_ref, d_pred, convention)


def mask_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], convention: str = "pooled"
) -> dict[str, float]:
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
        "hd95": hd95(pred, ref, spacing, convention),
    }


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    convention: str = "pooled",
    labels: str = "canonical",
) -> dict[str, dict[str, float]]:
    """Metrics of one case: region (``regions_of(labels)``: ``wt``, ``tc``, ``et``, ``netc``,
    ``snfh``, and ``rc`` where ``labels`` has it) -> metric -> value.

    ``pred`` and ``ref`` are label volumes of the same shape in the label convention
    ``labels`` (default canonical: 0 background, 1 NCR, 2 ED, 3 ET); ``spacing`` is the voxel
    size in mm along each axis (used for HD95); ``convention`` the HD95 convention.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ref.ndim}D volume")
    out = {}
    for region, values in regions_of(labels).items():
        out[region] = {
            name: float(value)
            for name, value in mask_metrics(
                np.isin(pred, values), np.isin(ref, values), spacing, convention
            ).items()
        }
    return out


# ---------------------------------------------------------------- summary


def bootstrap_picks(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n)`` case indices: seeded draws of ``n`` cases with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile 95% CI of the mean from ``resamples`` seeded bootstrap resamples."""
    picks = bootstrap_picks(len(values), resamples, seed)
    low, high = np.percentile(values[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def summarise(df: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Per metric and region of a per-case table: n, mean, median, std (ddof 1), 95% CI.

    ``df`` has the columns of ``metrics.csv``; the result has one row per metric and region
    of ``df`` (in ``METRICS`` and ``REGION_ORDER`` order) and columns metric, region, n, mean,
    median, std, ci_low, ci_high. Each group's bootstrap uses the same ``seed``.
    """
    rows = []
    regions = ordered_regions(df["region"])
    for metric in metrics_of(df):
        for region in regions:
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
    """Compact text table of the means: one row per region, one column per main metric."""
    means = summary.pivot(index="region", columns="metric", values="mean")
    main = ("dice", "iou", "acc", "sens", "spec", "hd95", "nsd", "lesion_dice", "lesion_hd95")
    shown = [
        m for m in metrics_of(pd.DataFrame(columns=means.columns)) if m.removesuffix("_max") in main
    ]
    means = means.reindex(index=ordered_regions(means.index), columns=shown)
    lines = ["region " + " ".join(f"{m:>11}" for m in shown)]
    for region, row in means.iterrows():
        lines.append(f"{region.upper():<6} " + " ".join(f"{v:>11.4f}" for v in row))
    return "\n".join(lines)


def save_boxplot(df: pd.DataFrame, path: Path) -> None:
    """Box plot of Dice and HD95 per region, one panel each, as PNG."""
    regions = ordered_regions(df["region"])
    hd95_column = next(m for m in metrics_of(df) if m.startswith("hd95"))
    save_region_boxplot(
        df,
        path,
        panels=[("dice", "Dice", "Dice"), (hd95_column, "HD95 (mm)", "HD95 (mm)")],
        regions=regions,
        size=(max(9, 1.5 * len(regions)), 4),
        title=f"{df['case_id'].nunique()} cases",
    )


# ---------------------------------------------------------------- tables and files


def scored_rows(
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing,
    hd95: str = "pooled",
    nsd_tolerance: float | None = None,
    labels: str = "canonical",
) -> tuple[list[dict], list[dict]]:
    """Rows of the per-case table (one per region of ``regions_of(labels)``) and of the
    per-lesion table, for one case whose ``pred`` and ``ref`` are label volumes in the label
    convention ``labels`` (``in_convention`` brings a prediction into its reference's); HD95
    columns named by ``metric_names(hd95)``."""
    names = dict(zip(METRICS, metric_names(hd95), strict=True))
    table = regions_of(labels)
    base = case_metrics(pred, ref, spacing, hd95, labels)
    lesion = lesion_scores(pred, ref, spacing, table, hd95=hd95, nsd_tolerance=nsd_tolerance)
    rows, lesion_rows = [], []
    for region in table:
        s = lesion[region]
        values = {
            **base[region],
            "nsd": s.nsd,
            "lesions_ref": s.n_ref,
            "lesions_pred": s.n_pred,
            "matched": s.matched,
            "missed": s.missed,
            "false": s.false,
            "lesion_dice": s.lesion_dsc,
            "lesion_nsd": s.lesion_nsd,
            "lesion_hd95": reported(s.lesion_hd95),
            "penalised_dice": s.penalised_dsc,
            "penalised_nsd": s.penalised_nsd,
            "penalised_hd95": s.penalised_hd95,
        }
        rows.append(
            {"case_id": case_id, "region": region, **{names[k]: values[k] for k in METRICS}}
        )
        for x in s.lesions:
            lesion_rows.append(
                {
                    "case_id": case_id,
                    "region": region,
                    "status": x.status,
                    "ref_id": x.ref_id,
                    "pred_id": x.pred_id,
                    "ref_voxels": x.ref_voxels,
                    "pred_voxels": x.pred_voxels,
                    "volume_mm3": float(x.volume_mm3),
                    "centre_i": x.centre[0],
                    "centre_j": x.centre[1],
                    "centre_k": x.centre[2],
                    "dice": x.dsc,
                    "nsd": x.nsd,
                    names["hd95"]: reported(x.hd95),
                }
            )
    return rows, lesion_rows


def case_table(rows: list[dict], hd95: str = "pooled") -> pd.DataFrame:
    """The per-case table; its last column ``hd95_convention`` names the HD95 convention."""
    df = pd.DataFrame(rows, columns=["case_id", "region", *metric_names(hd95)])
    return df.assign(**{HD95_TAG: hd95})


def lesion_table(rows: list[dict], hd95: str = "pooled") -> pd.DataFrame:
    """The per-lesion table; its last column ``hd95_convention`` names the HD95 convention."""
    columns = [
        c if c != "hd95" else metric_names(hd95)[BASE_METRICS.index("hd95")] for c in LESION_COLUMNS
    ]
    return pd.DataFrame(rows, columns=columns).assign(**{HD95_TAG: hd95})


def case_means(df: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """``{"test/dice_wt": mean over cases, ..., "test/dice_mean": mean over WT, TC, ET}``:
    a mean per metric and region of ``df`` (``test/dice_netc`` too), and ``*_mean`` over
    ``BRATS_REGIONS`` only, so that it means the same whatever the label convention."""
    metrics = metrics_of(df)
    means = df.groupby("region")[metrics].mean()
    brats = [r for r in BRATS_REGIONS if r in means.index]
    out = {}
    for m in metrics:
        out.update(
            {f"{prefix}/{m}_{r}": float(means.loc[r, m]) for r in ordered_regions(means.index)}
        )
        out[f"{prefix}/{m}_mean"] = float(means.loc[brats, m].mean())
    return out


def output_paths(output: Path) -> dict[str, Path]:
    """The output files side by side: per-case CSV, summary CSV, box plot, per-lesion CSV."""
    return {
        "metrics": output,
        "summary": output.with_name(f"{output.stem}_summary.csv"),
        "boxplot": output.with_name(f"{output.stem}_boxplot.png"),
        "lesions": output.with_name(f"{output.stem}_lesions.csv"),
    }


def write_outputs(
    df: pd.DataFrame,
    summary: pd.DataFrame,
    paths: dict[str, Path],
    lesions: pd.DataFrame | None = None,
    extra: Sequence[tuple[Path, Callable[[Path], None]]] = (),
) -> None:
    """Write the tables and the plot atomically; the per-lesion CSV only with ``lesions``;
    ``extra`` ``(path, writer)`` files (overlays) with them, all or nothing."""
    files = [
        (paths["metrics"], lambda p: df.to_csv(p, index=False)),
        (paths["summary"], lambda p: summary.to_csv(p, index=False)),
        (paths["boxplot"], lambda p: save_boxplot(df, p)),
    ]
    if lesions is not None:
        files.append((paths["lesions"], lambda p: lesions.to_csv(p, index=False)))
    write_atomically([*files, *extra])


def log_to_mlflow(
    client: MlflowClient,
    run_id: str,
    summary: pd.DataFrame,
    paths: dict[str, Path],
    hd95: str = "pooled",
) -> None:
    """Means as ``case/<metric>_<region>`` metrics, the tag ``hd95_convention`` and the output
    files as artifacts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"case/{row.metric}_{row.region}", float(row.mean), now, 0)
        for row in summary.itertuples()
    ]
    client.log_batch(run_id, metrics=metrics)
    client.set_tag(run_id, HD95_TAG, hd95)
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
