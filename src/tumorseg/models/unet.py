"""Vanilla U-Net (Ronneberger et al., MICCAI 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tumorseg.models.blocks import DoubleConv, Encoder, check_args, check_size


class UNet(nn.Module):
    """U-Net: double convs, max-pool down, transposed-conv up, concatenated skips.

    Args:
        in_channels: input channels (4 MRI modalities).
        out_channels: output channels (3 regions or 4 labels).
        features: widths per level, e.g. ``(32, 64, 128, 256)``; ``len(features)`` levels.
        norm: ``batch``, ``instance``, ``group`` or ``none``.
        dropout: ``Dropout2d`` probability inside each block.

    Input ``(N, in_channels, H, W)``, output logits ``(N, out_channels, H, W)``. H and W must be
    multiples of ``2 ** (len(features) - 1)``; other sizes raise a ``ValueError`` (no padding).
    """

    block = DoubleConv

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        features: Sequence[int] = (32, 64, 128, 256),
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_args(in_channels, out_channels, features, dropout)
        features = list(features)
        self.levels = len(features)
        self.encoder = Encoder(in_channels, features, self.block, norm, dropout)
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(self.levels - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(features[i], features[i - 1], 2, stride=2))
            self.decoder.append(self.block(2 * features[i - 1], features[i - 1], norm, dropout))
        self.head = nn.Conv2d(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_size(x, self.levels)
        skips = self.encoder(x)
        y = skips.pop()
        for up, dec in zip(self.ups, self.decoder, strict=True):
            y = dec(torch.cat([skips.pop(), up(y)], dim=1))
        return self.head(y)
