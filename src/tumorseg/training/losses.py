"""Losses: soft Dice plus BCE (regions) or cross-entropy (labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over channels of the batch-pooled soft Dice. Inputs ``(N, C, H, W)``."""
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2 * inter + smooth) / (total + smooth)).mean()


class RegionLoss(nn.Module):
    """BCE + soft Dice on sigmoid region channels (WT, TC, ET)."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        target = regions.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return self.ce_weight * bce + self.dice_weight * soft_dice_loss(logits.sigmoid(), target)


class LabelLoss(nn.Module):
    """Cross-entropy + soft Dice over the foreground classes (1 NCR, 2 ED, 3 ET) of a softmax."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels.long())
        probs = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(labels.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(probs, onehot)
