"""Compare U-Net variants from their MLflow runs: table, figures and paired case-level tests.

``build_report`` (behind ``tumorseg-report --experiment NAME``) reads the FINISHED training
runs of an MLflow experiment (Optuna parent runs, tagged ``optuna_parent``, and earlier reports
are skipped), groups them by their ``variant`` tag and writes into ``--output`` (default
``reports/<experiment>``)::

    tumorseg-report --experiment variant_comparison --output experiments/variant_comparison

* ``summary.md``, ``summary.csv``: per variant, the number of runs and mean ± std (ddof 1, over
  the variant's runs, i.e. seeds or folds) of ``<prefix>/{dice,iou,acc}_{wt,tc,et}``, then,
  where the runs' ``evaluation/test_cases.csv`` have them, the same over runs of each run's
  mean over its test cases of the lesion-wise Dice, lesion-wise HD95 (``lesion_hd95``, or
  ``lesion_hd95_max`` for the other convention), NSD and lesion-wise NSD per region
  (``lesion_dice_wt_mean``, ...; runs without case-level results do not count there);
  ``summary.md`` also lists every run and whether it has case-level results.
* ``learning_curves.png``: ``val/dice_mean`` per epoch, mean over a variant's runs with a
  ±1 std band.
* ``case_dice_boxplot.png``: case-level Dice per region and variant from each run's
  ``evaluation/test_cases.csv`` artifact (columns as ``tumorseg-evaluate``'s ``metrics.csv``);
  a case's Dice is first averaged over the runs of its variant.
* ``pairwise.md``, ``pairwise.csv``: for each pair of variants (A, B) and region, the
  Wilcoxon signed-rank test (two-sided, ``scipy.stats.wilcoxon``) on those per-case Dice values
  paired by case id: number of cases, median difference B − A, p-value. With fewer than
  ``MIN_PAIRS`` cases, or when all differences are zero, the p-value is NaN and a note says why.
  A run without the artifact is named in the notes and left out of the box plot and the tests.
  ``--holm`` adds Holm-adjusted p-values over all the tests of the table (``p_holm``).
* ``ranking.md``, ``ranking.csv``: the BraTS ranking. Per test case, region (WT, TC, ET) and
  metric, the variants are ranked (1 best; ties share the mean of their ranks) on the
  lesion-wise Dice (higher better) and lesion-wise HD95 (lower better) of the case-level CSVs,
  or on Dice and HD95 when the CSVs have no lesion-wise columns, each case's value first
  averaged over the runs of its variant; a variant's score is its mean rank over all of them,
  and the positions follow from the scores. Only cases every compared variant was scored on
  enter. ``BOOTSTRAP`` resamples of the cases (with replacement, seeded) show how stable each
  position is: the share of resamples in which the variant is first and the 95 % interval of
  its position.

The same files are logged as artifacts of a new run named ``report`` (tag ``report=true``) in
the experiment. Tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
the project's local store (a SQLite file that does not exist is an error, not a new store).
Exit status: 0, 2 for bad input (nothing written), 1 when writing or logging fails.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tumorseg.core.errors import DataError, first_line

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

REGIONS = ("wt", "tc", "et")
METRICS = {"dice": "Dice", "iou": "IoU", "acc": "acc."}  # MLflow key part -> table header
PREFERRED_ORDER = ("unet", "attention_unet", "residual_unet")  # the baseline first
CURVE_METRIC = "val/dice_mean"
CASE_ARTIFACT = "evaluation/test_cases.csv"
MIN_PAIRS = 6  # below this the exact two-sided Wilcoxon p-value cannot reach 0.05
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
# case-level columns the summary adds per variant where the case CSVs have them
CASE_SUMMARY = {
    "lesion_dice": "lesion Dice",
    "lesion_hd95": "lesion HD95",
    "lesion_hd95_max": "lesion HD95 (max)",
    "nsd": "NSD",
    "lesion_nsd": "lesion NSD",
}
BOOTSTRAP, BOOTSTRAP_SEED = 1000, 0  # resamples of the cases for the ranking's stability
FILES = (
    "summary.md",
    "summary.csv",
    "pairwise.md",
    "pairwise.csv",
    "ranking.md",
    "ranking.csv",
    "learning_curves.png",
    "case_dice_boxplot.png",
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- reading MLflow


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
    df = df[df["region"].isin(REGIONS)].dropna(subset=["case_id", "dice"])
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


# ---------------------------------------------------------------- statistics


def case_summary_columns(cases: pd.DataFrame) -> list[str]:
    """``<metric>_<region>`` of the ``CASE_SUMMARY`` metrics some case CSV has a value of."""
    present = [m for m in CASE_SUMMARY if m in cases and cases[m].notna().any()]
    return [f"{metric}_{region}" for metric in present for region in REGIONS]


def run_case_means(cases: pd.DataFrame) -> pd.DataFrame:
    """Per run (index run_id): ``<metric>_<region>``, the mean over its test cases of each
    ``CASE_SUMMARY`` metric some case CSV has."""
    columns = case_summary_columns(cases)
    if not columns:
        return pd.DataFrame(index=pd.Index([], name="run_id"))
    metrics = list(dict.fromkeys(c.rsplit("_", 1)[0] for c in columns))
    per_run = cases.groupby(["run_id", "region"])[metrics].mean().unstack("region")
    per_run.columns = [f"{metric}_{region}" for metric, region in per_run.columns]
    return per_run.reindex(columns=columns)


def summary_table(
    frame: pd.DataFrame, variants: Sequence[str], cases: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per variant: n_runs and ``<metric>_<region>_mean`` / ``_std`` (ddof 1) over its runs,
    of the run metrics and (with ``cases``) of each run's case means (``run_case_means``)."""
    per_run = run_case_means(cases) if cases is not None else pd.DataFrame()
    frame = frame.join(per_run, on="run_id") if len(per_run.columns) else frame
    rows = []
    for variant in variants:
        runs = frame[frame["variant"] == variant]
        row: dict[str, object] = {"variant": variant, "n_runs": len(runs)}
        for column in metric_columns() + list(per_run.columns):
            values = runs[column].dropna()
            row[f"{column}_mean"] = values.mean() if len(values) else np.nan
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def summary_columns(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(``<metric>_<region>``, table header) of every metric the summary holds."""
    out = [
        (f"{metric}_{region}", f"{region.upper()} {title}")
        for metric, title in METRICS.items()
        for region in REGIONS
    ]
    out += [
        (f"{metric}_{region}", f"{region.upper()} {title}")
        for metric, title in CASE_SUMMARY.items()
        for region in REGIONS
        if f"{metric}_{region}_mean" in summary
    ]
    return out


def case_means(cases: pd.DataFrame) -> pd.DataFrame:
    """``CASE_METRICS`` per variant, case and region, averaged over the variant's runs."""
    keys = ["variant", "case_id", "region"]
    return cases.groupby(keys, as_index=False)[list(CASE_METRICS)].mean()


def paired_test(a: pd.Series, b: pd.Series) -> dict[str, object]:
    """Wilcoxon signed-rank test of ``b`` against ``a`` (Series indexed by case id)."""
    from scipy.stats import wilcoxon

    a, b = a.align(b, join="inner")
    diff = (b - a).to_numpy(dtype=float)
    out: dict[str, object] = {
        "n_cases": len(diff),
        "median_diff": float(np.median(diff)) if len(diff) else np.nan,
        "p_value": np.nan,
        "note": "",
    }
    if len(diff) < MIN_PAIRS:
        out["note"] = f"fewer than {MIN_PAIRS} paired cases"
    elif not np.any(diff):
        out["note"] = "all differences zero"
    else:
        out["p_value"] = float(wilcoxon(b.to_numpy(float), a.to_numpy(float)).pvalue)
    return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def pairwise_table(means: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """One row per pair of variants (A before B in ``variants``) and region."""
    rows = []
    for a, b in itertools.combinations(variants, 2):
        for region in REGIONS:
            series = {
                v: means[(means["variant"] == v) & (means["region"] == region)].set_index(
                    "case_id"
                )["dice"]
                for v in (a, b)
            }
            result = paired_test(series[a], series[b])
            absent = [v for v in (a, b) if series[v].empty]
            if absent:
                result["note"] = "no case-level results for " + " and ".join(absent)
            rows.append({"variant_a": a, "variant_b": b, "region": region, **result})
    columns = ["variant_a", "variant_b", "region", "n_cases", "median_diff", "p_value", "note"]
    return pd.DataFrame(rows, columns=columns)


def rank_metrics(means: pd.DataFrame) -> list[tuple[str, bool]]:
    """(column, higher is better) to rank on: lesion-wise Dice and HD95 where the case CSVs
    have them, else Dice and HD95 (or Dice alone)."""

    def present(column: str) -> bool:
        return column in means and bool(means[column].notna().any())

    for dice, hd95s in (
        ("lesion_dice", ("lesion_hd95", "lesion_hd95_max")),
        ("dice", ("hd95", "hd95_max")),
    ):
        hd95 = next((c for c in hd95s if present(c)), None)
        if present(dice) and hd95:
            return [(dice, True), (hd95, False)]
    return [("dice", True)]


def case_ranks(means: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """Rank of each variant per case, region and metric (1 best, ties share the mean rank),
    on the cases where every one of ``variants`` has the metric: columns case_id, region,
    metric, variant, rank."""
    parts = []
    for metric, higher in rank_metrics(means):
        wide = means.pivot_table(index=["case_id", "region"], columns="variant", values=metric)
        wide = wide.reindex(columns=list(variants)).dropna()
        if wide.empty:
            continue
        ranks = wide.rank(axis=1, ascending=not higher, method="average")
        long = ranks.stack().rename("rank").reset_index().assign(metric=metric)
        parts.append(long)
    columns = ["case_id", "region", "metric", "variant", "rank"]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def ranking_table(
    ranks: pd.DataFrame,
    variants: Sequence[str],
    resamples: int = BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Mean rank and position per variant, with the bootstrap over cases: ``p_first`` (share
    of resamples where the variant is first; ties for first count for each) and the 2.5 and
    97.5 percentiles of its position."""
    columns = ["position", "variant", "mean_rank", "n_cases", "p_first", "pos_low", "pos_high"]
    if ranks.empty:
        return pd.DataFrame(columns=columns)
    variants = list(variants)
    sums = ranks.pivot_table(index="case_id", columns="variant", values="rank", aggfunc="sum")
    sums = sums.reindex(columns=variants)
    counts = ranks[ranks["variant"] == variants[0]].groupby("case_id").size()
    counts = counts.reindex(sums.index).to_numpy(float)
    s = sums.to_numpy(float)
    mean_rank = s.sum(axis=0) / counts.sum()
    position = pd.Series(mean_rank).rank(method="min").to_numpy()
    rng = np.random.default_rng(seed)
    n = len(counts)
    picks = rng.integers(0, n, size=(resamples, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in picks])
    boot = (weights @ s) / (weights @ counts)[:, None]
    boot_pos = pd.DataFrame(boot).rank(axis=1, method="min").to_numpy()
    rows = [
        {
            "position": int(position[k]),
            "variant": v,
            "mean_rank": float(mean_rank[k]),
            "n_cases": n,
            "p_first": float(np.mean(boot_pos[:, k] == 1)),
            "pos_low": float(np.percentile(boot_pos[:, k], 2.5)),
            "pos_high": float(np.percentile(boot_pos[:, k], 97.5)),
        }
        for k, v in enumerate(variants)
    ]
    return pd.DataFrame(rows, columns=columns).sort_values(["position", "variant"], kind="stable")


# ---------------------------------------------------------------- text


def mean_std(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def data_note(frame: pd.DataFrame) -> str:
    sources = ", ".join(sorted(set(frame["data_source"]) - {""})) or "unknown"
    manifests = sorted(set(frame["data_manifest"]) - {""})
    note = f"Data source: {sources}; data manifest(s): {', '.join(manifests) or 'unknown'}."
    if len(manifests) > 1:
        note += " The runs used different data (cases or split): compare with care."
    return note


def summary_markdown(
    summary: pd.DataFrame, frame: pd.DataFrame, status: dict[str, str], context: dict[str, str]
) -> str:
    """``summary.md``: the variant table, then the runs it is made of."""
    columns = summary_columns(summary)
    header = ["variant", "n runs"] + [title for _, title in columns]
    rows = [
        [row["variant"], row["n_runs"]]
        + [mean_std(row[f"{c}_mean"], row[f"{c}_std"]) for c, _ in columns]
        for _, row in summary.iterrows()
    ]
    lines = [
        f"# Variant comparison: experiment `{context['experiment']}`",
        "",
        f"{len(frame)} FINISHED training runs (filter: `{context['filter'] or 'none'}`); "
        f"`{context['prefix']}/*` metrics, mean ± std over the runs of each variant "
        "(std with ddof 1; none for a single run); lesion-wise and NSD columns, where the "
        f"runs' `{CASE_ARTIFACT}` have them: the same over each run's mean over its test "
        "cases.",
        "",
        *markdown_table(header, rows),
        "",
        data_note(frame),
        "",
        "## Runs",
        "",
    ]
    run_rows = [
        [r.variant, f"`{r.run_id}`", r.run_name, r.seed or "–", r.fold or "–", status[r.run_id]]
        for r in frame.itertuples()
    ]
    lines += markdown_table(
        ["variant", "run id", "run name", "seed", "fold", f"`{CASE_ARTIFACT}`"], run_rows
    )
    missing = [r for r in frame.itertuples() if not status[r.run_id].endswith(" rows")]
    if missing:
        lines += [
            "",
            f"{len(missing)} run(s) without usable case-level results, left out of the box "
            "plot and the paired tests: " + ", ".join(f"`{r.run_id}`" for r in missing) + ".",
        ]
    return "\n".join(lines) + "\n"


def pairwise_markdown(pairwise: pd.DataFrame, n_variants: int) -> str:
    """``pairwise.md``: the paired tests with their notes (and Holm-adjusted p-values when the
    table has ``p_holm``)."""
    adjusted = "p_holm" in pairwise
    correction = (
        "Holm-adjusted p-values (Holm-Bonferroni over all the tests of this table) are in the "
        "last p column."
        if adjusted
        else "p-values are not corrected for multiple comparisons (`--holm` adds Holm's)."
    )
    lines = [
        "# Paired tests of case-level Dice",
        "",
        "Wilcoxon signed-rank test (two-sided, `scipy.stats.wilcoxon`) per region on the "
        "test cases both variants were scored on, paired by case id; each case's Dice is first "
        "averaged over the runs of its variant. Median difference is B − A (positive: B "
        f"better). p-value NaN: fewer than {MIN_PAIRS} paired cases or all differences zero "
        f"(see note). {correction}",
        "",
    ]
    if n_variants < 2:
        return "\n".join(lines + ["Only one variant: nothing to compare."]) + "\n"
    rows = [
        [
            r.variant_a,
            r.variant_b,
            r.region.upper(),
            r.n_cases,
            "–" if np.isnan(r.median_diff) else f"{r.median_diff:+.4f}",
            "NaN" if np.isnan(r.p_value) else f"{r.p_value:.4g}",
            *(["NaN" if np.isnan(r.p_holm) else f"{r.p_holm:.4g}"] if adjusted else []),
            r.note,
        ]
        for r in pairwise.itertuples()
    ]
    header = ["variant A", "variant B", "region", "n cases", "median ΔDice (B − A)", "p-value"]
    header += ["p (Holm)"] if adjusted else []
    return "\n".join(lines + markdown_table([*header, "note"], rows)) + "\n"


def ranking_markdown(ranking: pd.DataFrame, ranks: pd.DataFrame, n_variants: int) -> str:
    """``ranking.md``: the BraTS-style ranking and its bootstrap stability."""
    metrics = ", ".join(f"`{m}`" for m in ranks["metric"].unique()) if len(ranks) else "–"
    lines = [
        "# BraTS-style ranking",
        "",
        "Per test case, region (WT, TC, ET) and metric the variants are ranked (1 best; ties "
        "share the mean of their ranks; Dice higher is better, HD95 lower), each case's value "
        "first averaged over the runs of its variant; the score is a variant's mean rank over "
        f"all of them (lower is better). Metrics: {metrics}; only cases every variant was "
        f"scored on. Stability: {BOOTSTRAP} bootstrap resamples of the cases (seed "
        f"{BOOTSTRAP_SEED}): the share in which the variant ranks first and the 95 % interval "
        "of its position.",
        "",
    ]
    if n_variants < 2 or ranking.empty:
        return (
            "\n".join([*lines, "Fewer than two variants with case-level results: no ranking."])
            + "\n"
        )
    rows = [
        [
            r.position,
            r.variant,
            f"{r.mean_rank:.3f}",
            r.n_cases,
            f"{100 * r.p_first:.1f} %",
            f"{r.pos_low:g}–{r.pos_high:g}",
        ]
        for r in ranking.itertuples()
    ]
    header = ["position", "variant", "mean rank", "n cases", "ranked first", "95 % position"]
    return "\n".join(lines + markdown_table(header, rows)) + "\n"


# ---------------------------------------------------------------- figures


def save_learning_curves(curves: pd.DataFrame, variants: Sequence[str], path: Path) -> None:
    """``val/dice_mean`` against epoch per variant: mean over runs, ±1 std band."""
    # imported here: seaborn and matplotlib are slow to import
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    hue_order = [v for v in variants if v in set(curves["variant"])]
    data = curves.astype({"epoch": int, "value": float})
    sns.lineplot(
        data=data,
        x="epoch",
        y="value",
        hue="variant",
        hue_order=hue_order,
        errorbar="sd",
        marker="o",
        ax=ax,
    )
    ax.set(xlabel="epoch", ylabel=CURVE_METRIC, title="Validation Dice (mean ± std over runs)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, format="png", dpi=100)


def save_boxplot(means: pd.DataFrame, variants: Sequence[str], path: Path) -> None:
    """Box plot of case-level Dice per region, one box per variant."""
    import seaborn as sns
    from matplotlib.figure import Figure

    data = means.assign(region=means["region"].str.upper())
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    hue_order = [v for v in variants if v in set(data["variant"])]
    common = dict(
        data=data,
        x="region",
        y="dice",
        hue="variant",
        order=[r.upper() for r in REGIONS],
        hue_order=hue_order,
        ax=ax,
    )
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated vert=
        warnings.filterwarnings("ignore", "vert: bool was deprecated")
        sns.boxplot(**common, fliersize=0)
    dark = {variant: "0.2" for variant in hue_order}
    sns.stripplot(**common, palette=dark, dodge=True, size=3, legend=False)
    ax.set(
        xlabel="",
        ylabel="case-level Dice",
        title=f"{data['case_id'].nunique()} test cases, Dice averaged over a variant's runs",
    )
    fig.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------- output


def write_files(
    output: Path, writers: dict[str, Callable[[Path], None]], files: Sequence[str] = FILES
) -> list[Path]:
    """Write every file into a temporary folder beside ``output``, then move them in.

    Report files (``files``) of an earlier run that this one does not write are removed;
    other files in ``output`` (a README, say) are kept. If a writer fails, ``output`` is
    left untouched.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name, writer in writers.items():
            writer(tmp / name)
        output.mkdir(exist_ok=True)
        for name in files:
            if name in writers:
                os.replace(tmp / name, output / name)
            else:
                (output / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [output / name for name in writers]


def log_report(
    client: MlflowClient, experiment_id: str, paths: Sequence[Path], context: dict[str, str]
) -> str:
    """A run named ``report`` (tag ``report=true``) holding ``paths``; returns its id."""
    tags = {"report": "true", "report_runs": context["n_runs"]}
    run = client.create_run(experiment_id, run_name="report", tags=tags)
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "metric_prefix", context["prefix"])
        client.log_param(run_id, "filter", context["filter"] or "none")
        for path in paths:
            client.log_artifact(run_id, str(path))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------- everything


def build_report(
    client: MlflowClient,
    experiment: str,
    where: str | None = None,
    prefix: str = "test",
    holm_correction: bool = False,
) -> tuple[str, dict, dict]:
    """Read the runs and compute everything: experiment id, file writers, context."""
    experiment_id = find_experiment(client, experiment)
    runs = training_runs(client, experiment_id, where)
    if not runs:
        matching = f" matching {where!r}" if where else ""
        raise DataError(f"experiment {experiment!r} has no FINISHED training runs{matching}")
    frame = runs_frame(runs, prefix)
    check_metrics(frame, prefix)
    variants = variant_order(frame["variant"].unique().tolist())
    context = {
        "experiment": experiment,
        "filter": where or "",
        "prefix": prefix,
        "n_runs": str(len(frame)),
    }
    curves = learning_curves(client, frame)
    cases, status = case_results(client, frame)
    summary = summary_table(frame, variants, cases)
    means = case_means(cases)
    pairwise = pairwise_table(means, variants)
    if holm_correction:
        pairwise = pairwise.assign(p_holm=holm(pairwise["p_value"].to_numpy(float)))
    ranked = [v for v in variants if v in set(means["variant"])]
    ranks = case_ranks(means, ranked) if len(ranked) > 1 else case_ranks(means.iloc[:0], ranked)
    ranking = ranking_table(ranks, ranked)

    writers: dict[str, Callable[[Path], None]] = {
        "summary.md": lambda p: p.write_text(summary_markdown(summary, frame, status, context)),
        "summary.csv": lambda p: summary.to_csv(p, index=False),
        "pairwise.md": lambda p: p.write_text(pairwise_markdown(pairwise, len(variants))),
        "pairwise.csv": lambda p: pairwise.to_csv(p, index=False),
        "ranking.md": lambda p: p.write_text(ranking_markdown(ranking, ranks, len(ranked))),
        "ranking.csv": lambda p: ranking.to_csv(p, index=False),
    }
    if not curves.empty:
        writers["learning_curves.png"] = lambda p: save_learning_curves(curves, variants, p)
    if not means.empty:
        writers["case_dice_boxplot.png"] = lambda p: save_boxplot(means, variants, p)
    return experiment_id, writers, context
