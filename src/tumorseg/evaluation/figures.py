"""Box plots of case-level scores per region: the one box-plot drawing of tumorseg, for
``tumorseg-evaluate`` and the test stage (a box per region) and for ``tumorseg-report`` (a box
per variant within each region).

seaborn and matplotlib are imported on the first plot (slow to import). The figure is a
``matplotlib.figure.Figure``, not attached to pyplot, so no backend is chosen or needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

BOX_COLOUR = "lightsteelblue"  # boxes of a plot without groups
POINT_COLOUR = "0.2"  # every row, drawn over its box


def save_region_boxplot(
    data: pd.DataFrame,
    path: Path,
    panels: Sequence[tuple[str, str, str]],
    regions: Sequence[str],
    groups: str | None = None,
    group_order: Sequence[str] = (),
    size: tuple[float, float] = (7, 4),
    title: str | None = None,
) -> None:
    """Box plots of a long table, one row per case and region, as PNG.

    One panel per ``(column, y label, panel title)`` of ``panels``, side by side. In each, along
    x, ``regions`` (column ``region``, labelled in upper case); with ``groups`` (a column, e.g.
    ``variant``) the boxes of a region are one per group, in ``group_order`` (groups without
    rows are left out), side by side. Every row is a dark point over its box, so outliers get no
    marker of their own. ``title``: the figure's, above the panels; ``size`` in inches.
    """
    # imported here: seaborn and matplotlib are slow to import and only needed for plots
    import seaborn as sns
    from matplotlib.figure import Figure

    data = data.assign(region=data["region"].str.upper())
    order = [r.upper() for r in regions]
    fig = Figure(figsize=size, layout="constrained")
    if groups:
        hue_order = [g for g in group_order if g in set(data[groups])]
        grouping: dict = dict(hue=groups, hue_order=hue_order)
        boxes: dict = {}
        points: dict = dict(palette={g: POINT_COLOUR for g in hue_order}, dodge=True, legend=False)
    else:
        grouping, boxes, points = {}, dict(color=BOX_COLOUR), dict(color=POINT_COLOUR)
    for ax, (column, ylabel, panel_title) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        common = dict(data=data, x="region", y=column, order=order, ax=ax, **grouping)
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated vert=
            warnings.filterwarnings("ignore", "vert: bool was deprecated")
            sns.boxplot(**common, **boxes, fliersize=0)
        sns.stripplot(**common, **points, size=3)
        ax.set(xlabel="", ylabel=ylabel, title=panel_title)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)
