"""Segmentation metrics per BraTS region (WT, TC, ET), built on torchmetrics.

Numbers here are pooled: true/false positives are summed over every pixel seen since the last
reset (all slices of an epoch, all ranks), then Dice, IoU and accuracy are computed once.
Empty-mask rule (as BraTS): prediction and reference both empty -> Dice 1 and IoU 1;
exactly one empty -> Dice 0 and IoU 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, BinaryJaccardIndex

from tumorseg.core.labels import REGIONS

KINDS = {"dice": BinaryF1Score, "iou": BinaryJaccardIndex, "acc": BinaryAccuracy}


class RegionMetrics(nn.Module):
    """Dice, IoU and pixel accuracy for each region, plus their means over regions."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict()
        for kind, cls in KINDS.items():
            extra = {} if kind == "acc" else {"zero_division": 1.0}
            for region in REGIONS:
                self.metrics[f"{kind}_{region}"] = cls(validate_args=False, **extra)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add boolean masks ``(N, 3, H, W)`` (regions in WT, TC, ET order)."""
        for i, region in enumerate(REGIONS):
            p, t = pred[:, i].int(), target[:, i].int()
            for kind in KINDS:
                self.metrics[f"{kind}_{region}"].update(p, t)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {name: m.compute() for name, m in self.metrics.items()}
        for kind in KINDS:
            out[f"{kind}_mean"] = torch.stack([out[f"{kind}_{r}"] for r in REGIONS]).mean()
        return out

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
