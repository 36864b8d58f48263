"""What a run returns to a sweep: the optimized metric(s), case-level, with their noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import compose_tiny
from tumorseg.core.errors import DataError
from tumorseg.core.labels import REGIONS
from tumorseg.data.readers import list_cases
from tumorseg.data.splits import split_cases
from tumorseg.evaluation.test_stage import validation_scores
from tumorseg.inference.predict import load_for_inference, predict_case
from tumorseg.sweep.objective import Score, fold_mean
from tumorseg.train import run

# two validation patients out of the four demo cases, one training and one test patient
TWO_VAL = [
    "data.val_fraction=0.5",
    "test=false",
    "trainer.max_epochs=1",
    "~logger",
    "callbacks.lr_monitor=null",
]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else 2 * np.count_nonzero(pred & ref) / total


@pytest.mark.slow
def test_case_level_objective_is_the_mean_over_validation_patients(tmp_path, demo_root):
    """val/case_dice_mean: each validation patient predicted volume by volume with the kept
    checkpoint, Dice per region, mean over regions then over patients; with a bootstrap
    standard error. Recomputed here case by case from predict_case."""
    cfg = compose_tiny(tmp_path, demo_root, [*TWO_VAL, "optimized_metric=val/case_dice_mean"])
    score = run(cfg)
    assert isinstance(score, Score) and score.metric == "val/case_dice_mean"
    ckpt = next((tmp_path / "out" / "checkpoints").glob("*.ckpt"))
    module = load_for_inference(ckpt, "cpu")
    cases = {c.case_id: c for c in list_cases(demo_root)}
    split = split_cases(sorted(cases), 0.5, cfg.data.test_fraction, cfg.data.split_seed)
    assert len(split["val"]) == 2
    per_case = []
    for cid in split["val"]:
        case = cases[cid].load()
        pred = predict_case(module, case)
        per_case.append(
            np.mean([dice(np.isin(pred, v), np.isin(case.seg, v)) for v in REGIONS.values()])
        )
    assert len(set(np.round(per_case, 6))) == 2, "both patients score alike: nothing to average"
    assert float(score) == pytest.approx(np.mean(per_case), abs=1e-9)
    # two patients: the bootstrap's spread of their mean is about |a - b| / 2 / sqrt(2) * ...
    assert score.stderr is not None and 0 < score.stderr < abs(per_case[0] - per_case[1])


@pytest.mark.slow
def test_several_objectives_come_back_in_order_with_the_parameter_count(tmp_path, demo_root):
    cfg = compose_tiny(
        tmp_path,
        demo_root,
        [*TWO_VAL, "optimized_metric=[val/dice_mean,model/params,predict/seconds_per_case]"],
    )
    dice_mean, params, seconds = run(cfg)
    assert [dice_mean.metric, params.metric, seconds.metric] == [
        "val/dice_mean",
        "model/params",
        "predict/seconds_per_case",
    ]
    module = load_for_inference(next((tmp_path / "out" / "checkpoints").glob("*.ckpt")), "cpu")
    assert params == sum(p.numel() for p in module.net.parameters())
    assert dice_mean.stderr is not None  # the pooled value's noise over the same patients
    assert 0 < seconds < 60


@pytest.mark.slow
def test_an_unknown_objective_is_named(tmp_path, demo_root):
    cfg = compose_tiny(tmp_path, demo_root, [*TWO_VAL, "optimized_metric=val/dice_nope"])
    with pytest.raises(DataError, match="'val/dice_nope'"):
        run(cfg)


def table(per_case: dict[str, tuple[float, int, int]]) -> pd.DataFrame:
    """A case_dice table: the same (dice, overlap, volume) in every region of a case."""
    rows = [
        dict(case_id=c, region=r, dice=d, overlap=o, volume=v, seconds=1.0)
        for c, (d, o, v) in per_case.items()
        for r in REGIONS
    ]
    return pd.DataFrame(rows)


def test_pooled_noise_weights_patients_by_tumour_size_the_case_mean_does_not():
    """One large tumour scored 0.9 and nine tiny ones scored 0.1: the case mean is 0.18, the
    pooled Dice is near 0.9, and resampling moves them by different amounts."""
    per_case = {"big": (0.9, 900, 1000)} | {f"s{i}": (0.1, 1, 10) for i in range(9)}
    scores = validation_scores(table(per_case), resamples=4000)
    assert scores["val/case_dice_mean"] == pytest.approx(0.18)
    sd = np.std([0.9] + [0.1] * 9, ddof=0)
    assert scores["val/case_dice_mean_stderr"] == pytest.approx(sd / np.sqrt(10), rel=0.08)
    assert scores["val/dice_mean_stderr"] != pytest.approx(
        scores["val/case_dice_mean_stderr"], rel=0.2
    )


def test_fold_mean_takes_every_fold_and_its_spread():
    m = fold_mean([Score(0.6), Score(0.7), Score(0.8)])
    assert float(m) == pytest.approx(0.7) and m.stderr == pytest.approx(0.1 / np.sqrt(3))
