"""Training learns, and a trained checkpoint's prediction lands on the tumour.

A short training of the tiny net on the easy demo (a clean signal, so that well under a minute
of training tells learning from not learning) must beat a floor far above what an untrained or
all-background model scores, and must not reach it when the training labels are shuffled
against the images. The trained checkpoint then predicts a whole case through the
inference path; the prediction must overlap the ground truth with its centroid within 3 mm,
and the same criterion must reject that prediction flipped along any axis or shifted by 5
voxels, so a voxel-axis mistake anywhere in the path cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from tests.conftest import compose_tiny
from tumorseg.data.readers import read_any
from tumorseg.inference.predict import load_for_inference, predict_case
from tumorseg.training.precision import auto_precision

EPOCHS = 6
WT_FLOOR = 0.5  # pooled validation WT Dice; all-background scores 0, untrained nets ~0.05
CASE_DICE_FLOOR = 0.5  # WT Dice of the predicted case
CENTROID_MM = 3.0
SHIFT = 5  # voxels


class ShuffledLabels(Dataset):
    """A training set whose label slices are permuted against its image slices."""

    def __init__(self, ds: Dataset, seed: int = 0) -> None:
        self.ds, self.perm = ds, np.random.default_rng(seed).permutation(len(ds))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, items: list[int]):
        image, _ = self.ds.__getitems__(list(items))
        _, labels = self.ds.__getitems__([int(i) for i in self.perm[list(items)]])
        return image, labels


def train_tiny(tmp_path: Path, demo_root: Path, shuffle_labels: bool = False):
    """Tiny net, fixed seed, a few full epochs on the 4-case demo; checkpoint and metrics.

    One intra-op thread: a net this small gains nothing from a second one, and two threads
    contending with any other busy process ran each step 20x slower (0.8 s instead of 35 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny(tmp_path, demo_root, shuffle_labels)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(tmp_path: Path, demo_root: Path, shuffle_labels: bool):
    cfg = compose_tiny(
        tmp_path,
        demo_root,
        [
            f"trainer.max_epochs={EPOCHS}",
            "trainer.limit_train_batches=1.0",
            "trainer.limit_val_batches=1.0",
            "data.batch_size=8",
            "data.demo_difficulty=easy",
            "data.min_brain_fraction=0.05",  # tiny keeps ~9 slices a case; learning needs more
            "seed=0",
        ],
    )
    L.seed_everything(0, workers=True)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    if shuffle_labels:
        dm.datasets["train"] = ShuffledLabels(dm.datasets["train"])
    model = hydra.utils.instantiate(cfg.model)
    model.config = OmegaConf.to_container(cfg, resolve=True)
    model.preprocessing = dm.preprocessing()  # as train.py does
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        precision=auto_precision("cpu"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return ckpt, metrics, dm.split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, easy_demo_root: Path):
    return train_tiny(tmp_path_factory.mktemp("learn"), easy_demo_root)


def test_short_training_learns(trained):
    _, metrics, _ = trained
    assert metrics["val/dice_wt"] >= WT_FLOOR, metrics


@pytest.mark.slow
def test_shuffled_labels_do_not_reach_the_floor(tmp_path, easy_demo_root):
    """The control: the same training with labels shuffled against the images fails."""
    _, metrics, _ = train_tiny(tmp_path, easy_demo_root, shuffle_labels=True)
    assert metrics["val/dice_wt"] < WT_FLOOR, metrics


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.argwhere(mask).mean(0), 1.0))[:3]


def on_target(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray) -> tuple[bool, str]:
    """WT Dice >= the floor and centroid within 3 mm of the ground truth's."""
    wt, ref = pred > 0, truth > 0
    dice = 2 * (wt & ref).sum() / (wt.sum() + ref.sum())
    dist = np.inf
    if wt.any():
        dist = float(np.linalg.norm(centroid_mm(wt, affine) - centroid_mm(ref, affine)))
    return bool(dice >= CASE_DICE_FLOOR and dist <= CENTROID_MM), f"Dice {dice:.3f}, {dist:.1f} mm"


def test_prediction_lands_on_the_tumour(trained, easy_demo_root):
    ckpt, _, split = trained
    # the training case with most tumour: this checks geometry, not generalisation
    cases = [read_any(easy_demo_root / cid) for cid in split["train"]]
    case = max(cases, key=lambda c: int((c.seg > 0).sum()))
    module = load_for_inference(ckpt, "cpu")
    pred = predict_case(module, case)
    assert pred.shape == case.seg.shape
    ok, why = on_target(pred, case.seg, case.affine)
    assert ok, why
    # The criterion must reject the same prediction in the wrong voxels.
    for axis in range(3):
        ok, why = on_target(np.flip(pred, axis), case.seg, case.affine)
        assert not ok, f"flip along axis {axis} passed: {why}"
        for shift in (SHIFT, -SHIFT):
            ok, why = on_target(np.roll(pred, shift, axis), case.seg, case.affine)
            assert not ok, f"shift of {shift} voxels along axis {axis} passed: {why}"
