import numpy as np
import pytest
import torch

from tumorseg.core.labels import (
    LabelError,
    from_canonical,
    labels_from_regions,
    regions_from_labels,
    to_canonical,
)
from tumorseg.training.losses import LabelLoss, RegionLoss
from tumorseg.training.scores import RegionMetrics


def scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    m = RegionMetrics()
    m.update(pred, target)
    return {k: v.item() for k, v in m.compute().items()}


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool).reshape(1, 3, 1, -1)


def test_hand_computed_dice_iou_accuracy():
    # WT: pred 1100, truth 1010 -> tp 1, fp 1, fn 1, tn 1: Dice 2/4, IoU 1/3, acc 2/4
    # TC: perfect; ET: both empty
    pred = masks([1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0])
    truth = masks([1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0])
    s = scores(pred, truth)
    assert s["dice_wt"] == pytest.approx(0.5)
    assert s["iou_wt"] == pytest.approx(1 / 3)
    assert s["acc_wt"] == pytest.approx(0.5)
    assert s["dice_tc"] == s["iou_tc"] == s["acc_tc"] == 1.0
    assert s["dice_et"] == s["iou_et"] == 1.0  # both empty -> 1
    assert s["dice_mean"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_empty_mask_rules():
    empty = masks([0] * 4, [0] * 4, [0] * 4)
    some = masks([0, 1, 0, 0], [0] * 4, [0] * 4)
    assert scores(some, empty)["dice_wt"] == 0.0  # false positive on empty reference
    assert scores(empty, some)["dice_wt"] == 0.0  # missed lesion
    assert scores(empty, some)["acc_wt"] == pytest.approx(0.75)
    assert scores(empty, empty)["dice_mean"] == 1.0


def test_disjoint_and_pooled_over_batches():
    m = RegionMetrics()
    # batch 1 (4 pixels): pred 1100, truth 1000 -> tp 1, fp 1, fn 0: Dice 2/3 on its own
    m.update(masks([1, 1, 0, 0], [0] * 4, [0] * 4), masks([1, 0, 0, 0], [0] * 4, [0] * 4))
    # batch 2 (8 pixels): perfect, tp 4 -> Dice 1 on its own
    wt = [1, 1, 1, 1, 0, 0, 0, 0]
    m.update(masks(wt, [0] * 8, [0] * 8), masks(wt, [0] * 8, [0] * 8))
    # pooled: tp 5, fp 1, fn 0 -> Dice 10/11; the mean of per-batch values would be 5/6
    assert m.compute()["dice_wt"].item() == pytest.approx(10 / 11)
    assert m.compute()["dice_wt"].item() != pytest.approx((2 / 3 + 1) / 2)
    m.reset()
    m.update(masks([1, 1, 0, 0], [0] * 4, [0] * 4), masks([0, 0, 1, 1], [0] * 4, [0] * 4))
    assert m.compute()["dice_wt"].item() == 0.0


def test_label_conventions():
    seg = np.array([0, 1, 2, 4], dtype=np.float32)
    canon = to_canonical(seg, "brats2020")
    assert canon.tolist() == [0, 1, 2, 3]
    assert from_canonical(canon, "brats2020").tolist() == [0, 1, 2, 4]
    assert to_canonical(np.array([0, 1, 2, 3]), "msd").tolist() == [0, 2, 1, 3]
    assert from_canonical(to_canonical(np.array([0, 1, 2, 3]), "msd"), "msd").tolist() == [
        0,
        1,
        2,
        3,
    ]
    with pytest.raises(LabelError, match="case_seg.nii.gz: unexpected label value 3"):
        to_canonical(np.array([0, 3]), "brats2020", "case_seg.nii.gz")
    with pytest.raises(LabelError, match="non-integer"):
        to_canonical(np.array([0, 1.5]), "brats2020", "x")


def test_regions_round_trip():
    labels = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    regions = regions_from_labels(labels)
    assert regions[0].int().tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert torch.equal(labels_from_regions(regions), labels)


def test_losses_prefer_correct_predictions():
    labels = torch.randint(0, 4, (2, 16, 16))
    good = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 20 - 10
    assert LabelLoss()(good, labels) < LabelLoss()(-good, labels)
    regions = regions_from_labels(labels)
    logits = regions.float() * 20 - 10
    assert RegionLoss()(logits, regions) < 0.05 < RegionLoss()(-logits, regions)
