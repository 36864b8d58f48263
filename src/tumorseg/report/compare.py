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
  ``stats.MIN_PAIRS`` cases, or when all differences are zero, the p-value is NaN and a note
  says why. A run without the artifact is named in the notes and left out of the box plot and
  the tests.
  ``--holm`` adds Holm-adjusted p-values over all the tests of the table (``p_holm``).
* ``ranking.md``, ``ranking.csv``: the BraTS ranking. Per test case, region (WT, TC, ET) and
  metric, the variants are ranked (1 best; ties share the mean of their ranks) on the
  lesion-wise Dice (higher better) and lesion-wise HD95 (lower better) of the case-level CSVs,
  or on Dice and HD95 when the CSVs have no lesion-wise columns, each case's value first
  averaged over the runs of its variant; a variant's score is its mean rank over all of them,
  and the positions follow from the scores. Only cases every compared variant was scored on
  enter. ``stats.BOOTSTRAP`` resamples of the cases (with replacement, seeded) show how stable
  each position is: the share of resamples in which the variant is first and the 95 % interval
  of its position.

The same files are logged as artifacts of a new run named ``report`` (tag ``report=true``) in
the experiment. Tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
the project's local store (a SQLite file that does not exist is an error, not a new store).
Exit status: 0, 2 for bad input (nothing written), 1 when writing or logging fails.

This module ties the parts together (``build_report``) and writes and logs the files: reading
MLflow is :mod:`tumorseg.report.runs`, the statistics :mod:`tumorseg.report.stats`, the
Markdown :mod:`tumorseg.report.render` and the figures :mod:`tumorseg.report.figures`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tumorseg.core.errors import DataError
from tumorseg.report.figures import save_learning_curves, save_variant_boxplot
from tumorseg.report.render import pairwise_markdown, ranking_markdown, summary_markdown
from tumorseg.report.runs import (
    case_results,
    check_metrics,
    find_experiment,
    learning_curves,
    runs_frame,
    training_runs,
    variant_order,
)
from tumorseg.report.stats import (
    case_ranks,
    holm,
    pairwise_table,
    ranking_table,
    summary_table,
    variant_case_means,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

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


# ---------------------------------------------------------------- the report


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
    means = variant_case_means(cases)
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
        writers["case_dice_boxplot.png"] = lambda p: save_variant_boxplot(means, variants, p)
    return experiment_id, writers, context


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
