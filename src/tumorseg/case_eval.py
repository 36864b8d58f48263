"""Case-level test stage: predict whole volumes, score them in 3D, log the results to MLflow.

The numbers are per case (Dice, IoU, accuracy, sensitivity, specificity, HD95 for WT, TC, ET),
then averaged over cases: ``test/dice_wt`` is the mean case Dice, as BraTS reports it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from tumorseg.data.nifti import Case
from tumorseg.evaluate import METRICS, case_metrics, output_paths, summarise, write_outputs
from tumorseg.module import SegModule
from tumorseg.overlay import overlay_figure
from tumorseg.predict import predict_case

log = logging.getLogger(__name__)


def score_cases(module: SegModule, cases: Iterable[Case], batch_size: int = 32) -> pd.DataFrame:
    """One row per case and region with every metric of ``tumorseg.evaluate``."""
    rows = []
    for case in cases:
        pred = predict_case(module, case, batch_size=batch_size)
        for region, values in case_metrics(pred, case.seg, case.spacing).items():
            rows.append({"case_id": case.case_id, "region": region, **values})
    return pd.DataFrame(rows, columns=["case_id", "region", *METRICS])


SHORT = {"accuracy": "acc", "sensitivity": "sens", "specificity": "spec"}


def case_means(df: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """``{"test/dice_wt": mean over cases, ..., "test/dice_mean": mean over regions}``."""
    means = df.groupby("region")[list(METRICS)].mean()
    out = {}
    for m in METRICS:
        name = SHORT.get(m, m)
        out.update({f"{prefix}/{name}_{r}": float(means.loc[r, m]) for r in means.index})
        out[f"{prefix}/{name}_mean"] = float(means[m].mean())
    return out


def write_overlays(module: SegModule, cases: Iterable[Case], folder: Path) -> list[Path]:
    """Three-view overlay PNG (FLAIR, truth solid, prediction dashed) per case."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases:
        pred = predict_case(module, case)
        fig = overlay_figure(case.image[0], case.seg, pred, case.affine, title=case.case_id)
        path = folder / f"{case.case_id}.png"
        fig.savefig(path, dpi=80)
        paths.append(path)
    return paths


def test_stage(
    module: SegModule,
    test_cases: Iterable[Case],
    overlay_cases: Iterable[Case],
    logger=None,
    step: int | None = None,
) -> dict[str, float]:
    """Score the test cases, log means, CSVs, box plot and overlays to the MLflow ``logger``."""
    module.eval()
    df = score_cases(module, test_cases)
    if df.empty:
        log.warning("no test cases to score")
        return {}
    means = case_means(df)
    with tempfile.TemporaryDirectory() as tmp:
        paths = output_paths(Path(tmp) / "test_cases.csv")
        write_outputs(df, summarise(df), paths)
        overlays = write_overlays(module, overlay_cases, Path(tmp) / "overlays")
        if logger is not None:
            logger.log_metrics(means, step=step)
            client, run_id = logger.experiment, logger.run_id
            for path in paths.values():
                client.log_artifact(run_id, str(path), "evaluation")
            for path in overlays:
                client.log_artifact(run_id, str(path), "evaluation/overlays")
    return means
