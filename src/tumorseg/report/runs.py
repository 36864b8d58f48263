"""Reading a variant comparison from MLflow: the experiment's training runs, their metrics,
learning curves and case-level test results (``evaluation/test_cases.csv``).

Used by :mod:`tumorseg.report.compare` (``tumorseg-report --experiment``) and
:mod:`tumorseg.report.study`.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tumorseg.core.errors import DataError, first_line
from tumorseg.core.labels import REGIONS

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

METRICS = {"dice": "Dice", "iou": "IoU", "acc": "acc."}  # MLflow key part -> table header
PREFERRED_ORDER = ("unet", "attention_unet", "residual_unet")  # the baseline first
CURVE_METRIC = "val/dice_mean"
CASE_ARTIFACT = "evaluation/test_cases.csv"
CASE_METRICS = (
    "dice",
    "hd95",
    "hd95_max",
    "nsd",
    "lesion_dice",
    "lesion_nsd",
    "lesion_hd95",
    "lesion_hd95_max",
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- runs and their metrics


def open_client(uri: str) -> MlflowClient:
    """Client for ``uri``; DataError for a SQLite file that does not exist (never creates one)."""
    # imported here: mlflow is slow to import
    from mlflow import MlflowClient

    from tumorseg.tracking.client import require_store

    require_store(uri)
    return MlflowClient(tracking_uri=uri)


def find_experiment(client: MlflowClient, name: str) -> str:
    """Id of the active experiment ``name``; DataError if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name)
    except MlflowException as err:
        raise DataError(f"cannot read experiment {name!r}: {first_line(err)}") from None
    if exp is None or exp.lifecycle_stage != "active":
        raise DataError(f"no experiment named {name!r} in the MLflow store")
    return exp.experiment_id


def is_training_run(run: Run) -> bool:
    """A variant's training run: not an Optuna parent, not a report."""
    tags = run.data.tags
    if "optuna_parent" in tags or tags.get("report") == "true" or run.info.run_name == "report":
        return False
    if "variant" not in tags:
        log.warning("skipping run %s: no variant tag", run.info.run_id)
        return False
    return True


def training_runs(client: MlflowClient, experiment_id: str, where: str | None) -> list[Run]:
    """FINISHED training runs of the experiment matching ``where``, oldest first."""
    from mlflow.exceptions import MlflowException

    query = "attributes.status = 'FINISHED'" + (f" and {where}" if where else "")
    runs, token = [], None
    try:
        while True:
            page = client.search_runs(
                [experiment_id], query, order_by=["attributes.start_time ASC"], page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as err:
        raise DataError(f"cannot search runs with filter {where!r}: {first_line(err)}") from None
    return [run for run in runs if is_training_run(run)]


def variant_order(names: Sequence[str]) -> list[str]:
    """Known variants in ``PREFERRED_ORDER`` (baseline first), then the others sorted."""
    known = [v for v in PREFERRED_ORDER if v in names]
    return known + sorted(set(names) - set(known))


def metric_value(metrics: dict[str, float], prefix: str, metric: str, region: str) -> float:
    """``<prefix>/<metric>_<region>``, else NaN."""
    return metrics.get(f"{prefix}/{metric}_{region}", np.nan)


def runs_frame(runs: Sequence[Run], prefix: str) -> pd.DataFrame:
    """One row per run: ids, variant, seed, fold, data tags and ``<metric>_<region>`` values."""
    rows = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "variant": tags["variant"],
            "seed": tags.get("seed", ""),
            "fold": run.data.params.get("data.fold", "").replace("None", ""),
            "data_source": tags.get("data_source", ""),
            "data_manifest": tags.get("data_manifest", ""),
        }
        for metric, region in itertools.product(METRICS, REGIONS):
            row[f"{metric}_{region}"] = metric_value(metrics, prefix, metric, region)
        rows.append(row)
    return pd.DataFrame(rows)


def metric_columns() -> list[str]:
    return [f"{metric}_{region}" for metric in METRICS for region in REGIONS]


def check_metrics(frame: pd.DataFrame, prefix: str) -> None:
    """DataError when no run has any ``<prefix>/<metric>_<region>`` value (e.g. a typo)."""
    if frame[metric_columns()].isna().all().all():
        raise DataError(
            f"no run has any {prefix}/dice_wt, {prefix}/iou_wt, ... metric (see --metric-prefix)"
        )


def metric_history(client: MlflowClient, run_id: str, key: str = CURVE_METRIC) -> pd.DataFrame:
    """``key`` per epoch of one run (columns epoch, value).

    Lightning logs an ``epoch`` metric at the same step as each epoch's metrics; a step without
    one gets its rank among the steps. Where an epoch was logged twice (a resumed run), the
    later value counts.
    """
    # NaN at step 0: the run declared its objective before measuring it
    history = [m for m in client.get_metric_history(run_id, key) if not np.isnan(m.value)]
    if not history:
        return pd.DataFrame(columns=["epoch", "value"])
    epochs = {m.step: int(m.value) for m in client.get_metric_history(run_id, "epoch")}
    steps = sorted({m.step for m in history})
    rank = {step: i for i, step in enumerate(steps)}
    rows = [
        (epochs.get(m.step, rank[m.step]), m.timestamp, m.value)
        for m in sorted(history, key=lambda m: (m.step, m.timestamp))
    ]
    frame = pd.DataFrame(rows, columns=["epoch", "timestamp", "value"])
    frame = frame.sort_values(["epoch", "timestamp"]).drop_duplicates("epoch", keep="last")
    return frame[["epoch", "value"]].reset_index(drop=True)


def learning_curves(client: MlflowClient, frame: pd.DataFrame) -> pd.DataFrame:
    """``val/dice_mean`` per epoch of every run (columns run_id, variant, epoch, value)."""
    parts = []
    for run in frame.itertuples():
        history = metric_history(client, run.run_id)
        if history.empty:
            log.warning("run %s has no %s history", run.run_id, CURVE_METRIC)
            continue
        parts.append(history.assign(run_id=run.run_id, variant=run.variant))
    if not parts:
        return pd.DataFrame(columns=["run_id", "variant", "epoch", "value"])
    return pd.concat(parts, ignore_index=True)[["run_id", "variant", "epoch", "value"]]


# ---------------------------------------------------------------- case-level results


def read_case_csv(path: Path) -> pd.DataFrame:
    """Case id, region, Dice and the other ``CASE_METRICS`` (NaN where the CSV has none) of a
    case-level CSV; ValueError without case id, region or Dice."""
    df = pd.read_csv(path, dtype={"case_id": str})
    missing = {"case_id", "region", "dice"} - set(df.columns)
    if missing:
        raise ValueError(f"missing column(s) {', '.join(sorted(missing))}")
    df = df.reindex(columns=["case_id", "region", *CASE_METRICS])
    df = df.assign(
        region=df["region"].astype(str).str.lower(),
        **{m: pd.to_numeric(df[m], errors="coerce") for m in CASE_METRICS},
    )
    df = df[df["region"].isin(list(REGIONS))].dropna(subset=["case_id", "dice"])
    if df.empty:
        raise ValueError("no Dice values for WT, TC or ET")
    return df


def run_cases(client: MlflowClient, run_id: str, tmp: Path) -> pd.DataFrame:
    """The run's case-level Dice; FileNotFoundError without the artifact, ValueError if bad."""
    listed = {f.path for f in client.list_artifacts(run_id, str(Path(CASE_ARTIFACT).parent))}
    if CASE_ARTIFACT not in listed:
        raise FileNotFoundError(f"no {CASE_ARTIFACT}")
    path = client.download_artifacts(run_id, CASE_ARTIFACT, str(tmp))
    return read_case_csv(Path(path))


def case_results(client: MlflowClient, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Case-level Dice of all runs (run_id, variant, case_id, region, dice) and, per run id,
    the number of rows read or why the run has none."""
    parts, status = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(frame.itertuples()):
            dst = Path(tmp) / str(i)
            dst.mkdir()
            try:
                cases = run_cases(client, run.run_id, dst)
            except (FileNotFoundError, ValueError) as err:
                kind = "missing" if isinstance(err, FileNotFoundError) else "unusable"
                status[run.run_id] = f"{kind}: {err}"
                log.warning(
                    "run %s (%s): %s; left out of the case-level tests",
                    run.run_id,
                    run.variant,
                    err,
                )
                continue
            status[run.run_id] = f"{len(cases)} rows"
            parts.append(cases.assign(run_id=run.run_id, variant=run.variant))
    columns = ["run_id", "variant", "case_id", "region", *CASE_METRICS]
    cases = pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)
    return cases, status
