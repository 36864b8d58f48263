"""Markdown of a variant comparison: ``summary.md``, ``pairwise.md`` and ``ranking.md`` from the
tables of :mod:`tumorseg.report.stats`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tumorseg.core.labels import REGIONS
from tumorseg.report.runs import CASE_ARTIFACT, METRICS
from tumorseg.report.stats import BOOTSTRAP, BOOTSTRAP_SEED, CASE_SUMMARY, MIN_PAIRS


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
