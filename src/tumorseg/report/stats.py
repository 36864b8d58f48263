"""Statistics of a variant comparison: the summary table over runs, case means, paired
Wilcoxon tests with Holm's adjustment, and the BraTS-style ranking with its bootstrap.

Inputs are the tables of :mod:`tumorseg.report.runs`: one row per run (``runs_frame``) and one
per run, case and region (``case_results``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tumorseg.core.labels import REGIONS
from tumorseg.report.runs import CASE_METRICS, metric_columns

MIN_PAIRS = 6  # below this the exact two-sided Wilcoxon p-value cannot reach 0.05
# case-level columns the summary adds per variant where the case CSVs have them
CASE_SUMMARY = {
    "lesion_dice": "lesion Dice",
    "lesion_hd95": "lesion HD95",
    "lesion_hd95_max": "lesion HD95 (max)",
    "nsd": "NSD",
    "lesion_nsd": "lesion NSD",
}
BOOTSTRAP, BOOTSTRAP_SEED = 1000, 0  # resamples of the cases for the ranking's stability


# ---------------------------------------------------------------- summary over runs


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


def variant_case_means(cases: pd.DataFrame) -> pd.DataFrame:
    """Per variant, case and region, each of ``CASE_METRICS`` averaged over the variant's runs:
    the case values the box plot, the paired tests and the ranking compare."""
    keys = ["variant", "case_id", "region"]
    return cases.groupby(keys, as_index=False)[list(CASE_METRICS)].mean()


# ---------------------------------------------------------------- paired tests


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


# ---------------------------------------------------------------- ranking


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
