"""Figures of a variant comparison: ``learning_curves.png`` and ``case_dice_boxplot.png`` (drawn
by :func:`tumorseg.evaluation.figures.save_region_boxplot`, as ``tumorseg-evaluate``'s)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tumorseg.core.labels import REGIONS
from tumorseg.evaluation.figures import save_region_boxplot
from tumorseg.report.runs import CURVE_METRIC


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


def save_variant_boxplot(means: pd.DataFrame, variants: Sequence[str], path: Path) -> None:
    """Box plot of case-level Dice per region, one box per variant, from
    :func:`tumorseg.report.stats.variant_case_means`."""
    title = f"{means['case_id'].nunique()} test cases, Dice averaged over a variant's runs"
    save_region_boxplot(
        means,
        path,
        panels=[("dice", "case-level Dice", title)],
        regions=list(REGIONS),
        groups="variant",
        group_order=variants,
        size=(7, 4),
    )
