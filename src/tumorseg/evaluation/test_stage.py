"""Case-level test stage: predict whole volumes, score them in 3D, log the results to MLflow.

Each test case is predicted exactly as ``tumorseg-predict`` would predict it (the same
``tumorseg.inference.predict.predict_case`` on the raw case, replaying the checkpoint's
preprocessing), and scored on its own grid by ``tumorseg.evaluation.cases``. The numbers are
per case (Dice, IoU, accuracy, sensitivity, specificity, HD95, NSD and the lesion-wise BraTS
metrics), then averaged over cases: ``test/dice_wt`` is the mean case Dice, as BraTS reports it, and
``test/lesion_dice_wt`` / ``test/lesion_hd95_wt`` the mean lesion-wise scores. The regions are
those of tumorseg's canonical labels, which every case is read into: WT, TC, ET, NETC
(``test/lesion_dice_netc``) and SNFH (``test/lesion_dice_snfh``); a resection cavity is
background in canonical labels, so RC is scored only by ``tumorseg-evaluate`` on BraTS 2024
references. ``test/<metric>_mean`` averages WT, TC and ET. The HD95 convention is the config's
``test_hd95`` (``pooled``, or ``max``: metrics ``test/hd95_max_*``); the run gets the tag
``hd95_convention`` with it, and the CSVs their ``hd95_convention`` column.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from tumorseg.core.labels import REGIONS
from tumorseg.data.case import Case
from tumorseg.evaluation.cases import (
    HD95_TAG,
    bootstrap_picks,
    case_means,
    case_table,
    lesion_table,
    output_paths,
    scored_rows,
    summarise,
    write_outputs,
)
from tumorseg.inference.overlay import overlay_figure
from tumorseg.inference.predict import predict_case, segmentation_image
from tumorseg.training.module import SegModule

log = logging.getLogger(__name__)


def score_cases(
    module: SegModule,
    cases: Iterable[Case],
    normalised: bool = False,
    predictions: Path | None = None,
    batch_size: int = 32,
    hd95: str = "pooled",
):
    """One row per case and region (canonical labels: WT, TC, ET, NETC, SNFH) with every
    metric of ``tumorseg.evaluation.cases`` and one row per lesion (two tables); with
    ``predictions``, each case's canonical labels are also saved there as ``<id>.nii.gz``."""
    rows, lesion_rows = [], []
    for case in cases:
        pred = predict_case(module, case, batch_size=batch_size, normalised=normalised)
        case_rows, lesions = scored_rows(case.case_id, pred, case.seg, case.spacing, hd95)
        rows.extend(case_rows)
        lesion_rows.extend(lesions)
        if predictions is not None:
            predictions.mkdir(parents=True, exist_ok=True)
            nib.save(segmentation_image(pred, case.affine), predictions / f"{case.case_id}.nii.gz")
    return case_table(rows, hd95), lesion_table(lesion_rows, hd95)


def case_dice(
    module: SegModule, cases: Iterable[Case], normalised: bool = False, batch_size: int = 32
) -> pd.DataFrame:
    """Dice of WT, TC and ET per case, predicted volume by volume through the inference path
    (as the test stage predicts), with the voxel counts behind it (``overlap``: 2|P∩R|,
    ``volume``: |P|+|R|, for a pooled Dice over any subset of cases) and ``seconds``: reading
    and predicting that case. Both masks empty: Dice 1, as the test stage scores it."""
    rows = []
    start = time.perf_counter()
    for case in cases:  # the iterator reads each case: its time counts
        pred = predict_case(module, case, batch_size=batch_size, normalised=normalised)
        seconds = time.perf_counter() - start
        for region, labels in REGIONS.items():
            p, r = np.isin(pred, labels), np.isin(case.seg, labels)
            overlap, volume = 2 * int(np.count_nonzero(p & r)), int(p.sum() + r.sum())
            dice = overlap / volume if volume else 1.0
            rows.append(
                dict(
                    case_id=case.case_id,
                    region=region,
                    dice=dice,
                    overlap=overlap,
                    volume=volume,
                    seconds=seconds,
                )
            )
        start = time.perf_counter()
    return pd.DataFrame(rows, columns=["case_id", "region", "dice", "overlap", "volume", "seconds"])


def _per_case(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per case (rows, in the table's order) and region (WT, TC, ET columns): Dice, overlap,
    volume."""
    wide = df.pivot(index="case_id", columns="region").loc[df["case_id"].unique()]
    cols = list(REGIONS)
    return (
        wide["dice"][cols].to_numpy(float),
        wide["overlap"][cols].to_numpy(float),
        wide["volume"][cols].to_numpy(float),
    )


def _pooled(overlap: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Pooled Dice over the second-to-last axis (cases), averaged over regions; empty: 1."""
    o, v = overlap.sum(axis=-2), volume.sum(axis=-2)
    return np.where(v > 0, o / np.maximum(v, 1), 1.0).mean(axis=-1)


def validation_scores(df: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Case-level validation metrics of a ``case_dice`` table and their noise.

    ``val/case_dice_{wt,tc,et}`` and ``val/case_dice_mean``: means over cases, as the test
    stage scores; ``val/case_dice_mean_stderr`` and ``val/dice_mean_stderr``: bootstrap standard
    errors (``resamples`` draws of the cases with replacement) of that mean and of the voxels'
    pooled Dice over the same patients (the noise of the pooled ``val/dice_mean``, which pools
    slices); ``predict/seconds_per_case`` with its standard error."""
    dice, overlap, volume = _per_case(df)
    n = len(dice)
    out = {f"val/case_dice_{r}": float(dice[:, i].mean()) for i, r in enumerate(REGIONS)}
    out["val/case_dice_mean"] = float(dice.mean(axis=1).mean())
    if n > 1:
        picks = bootstrap_picks(n, resamples, seed)
        out["val/case_dice_mean_stderr"] = float(dice.mean(axis=1)[picks].mean(axis=1).std(ddof=1))
        out["val/dice_mean_stderr"] = float(_pooled(overlap[picks], volume[picks]).std(ddof=1))
    seconds = df.drop_duplicates("case_id")["seconds"].to_numpy(float)
    out["predict/seconds_per_case"] = float(seconds.mean())
    if n > 1:
        out["predict/seconds_per_case_stderr"] = float(seconds.std(ddof=1) / np.sqrt(n))
    return out


def write_overlays(
    module: SegModule, cases: Iterable[Case], folder: Path, normalised: bool = False
) -> list[Path]:
    """Three-view overlay PNG (FLAIR, truth solid, prediction dashed) per case."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases:
        pred = predict_case(module, case, normalised=normalised)
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
    normalised: bool = False,
    save_predictions: bool = True,
    hd95: str = "pooled",
) -> dict[str, float]:
    """Score the test cases, log means, CSVs, box plot, overlays and (``save_predictions``)
    the predicted segmentations (``evaluation/predictions/<id>.nii.gz``, canonical labels) to
    the MLflow ``logger``. ``normalised``: the cases are store volumes, already z-scored."""
    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        preds = Path(tmp) / "predictions" if save_predictions and logger is not None else None
        df, lesions = score_cases(module, test_cases, normalised, preds, hd95=hd95)
        if df.empty:
            log.warning("no test cases to score")
            return {}
        means = case_means(df)
        paths = output_paths(Path(tmp) / "test_cases.csv")
        write_outputs(df, summarise(df), paths, lesions)
        overlays = write_overlays(module, overlay_cases, Path(tmp) / "overlays", normalised)
        if logger is not None:
            logger.log_metrics(means, step=step)
            client, run_id = logger.experiment, logger.run_id
            client.set_tag(run_id, HD95_TAG, hd95)
            for path in paths.values():
                client.log_artifact(run_id, str(path), "evaluation")
            for path in overlays:
                client.log_artifact(run_id, str(path), "evaluation/overlays")
            if preds is not None:
                client.log_artifacts(run_id, str(preds), "evaluation/predictions")
    return means
