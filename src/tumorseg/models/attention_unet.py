"""Attention U-Net (Oktay et al., MIDL 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tumorseg.models.blocks import AttentionGate, check_size
from tumorseg.models.unet import UNet


class AttentionUNet(UNet):
    """U-Net with additive attention gates on the skip connections.

    Each skip is gated by the upsampled decoder features of the level below before it is
    concatenated. Same arguments, shapes and size rule as :class:`tumorseg.models.unet.UNet`.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        features: Sequence[int] = (32, 64, 128, 256),
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, out_channels, features, norm, dropout)
        features = list(features)
        self.gates = nn.ModuleList(
            AttentionGate(features[i - 1], features[i - 1], max(1, features[i - 1] // 2), norm)
            for i in range(self.levels - 1, 0, -1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(x, self.levels)
        skips = self.encoder(x)
        y = skips.pop()
        for up, gate, dec in zip(self.ups, self.gates, self.decoder, strict=True):
            g = up(y)
            y = dec(torch.cat([gate(skips.pop(), g), g], dim=1))
        return self.head(y)
