"""Building blocks shared by the U-Net variants."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORMS = ("batch", "instance", "group", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name: batch, instance, group (8 groups) or none."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_args(
    in_channels: int, out_channels: int, features: Sequence[int], dropout: float
) -> None:
    """Shared argument checks of every variant."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(
            f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}"
        )
    if len(features) < 2 or any(f < 1 for f in features):
        raise ValueError(
            f"features needs >= 2 positive widths (one per level), got {list(features)}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def check_size(x: torch.Tensor, levels: int) -> None:
    """Raise a ValueError unless height and width are divisible by 2**(levels - 1)."""
    step = 2 ** (levels - 1)
    h, w = x.shape[-2:]
    if x.ndim != 4 or h % step or w % step:
        examples = ", ".join(str(step * k) for k in (8, 15, 16, 30))
        raise ValueError(
            f"input must be (N, C, H, W) with H and W multiples of {step} for {levels} levels "
            f"(e.g. {examples}); got {tuple(x.shape)}"
        )


class ConvNormAct(nn.Sequential):
    """3x3 convolution, normalisation, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm == "none"),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Module):
    """Two ConvNormAct layers with optional dropout between them (Ronneberger 2015)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_ch, out_ch, norm)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = ConvNormAct(out_ch, out_ch, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.drop(self.conv1(x)))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut; the shortcut is a 1x1 projection when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, dropout: float = 0.0) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_ch)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_ch)
        if in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=bias), make_norm(norm, out_ch)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(self.drop(y)))
        return self.act(y + self.shortcut(x))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018).

    Weights the skip features ``x`` by a coefficient in [0, 1] per pixel, computed from ``x``
    and the gating signal ``g`` from the coarser decoder level (already at ``x``'s size).
    """

    def __init__(self, x_ch: int, g_ch: int, inter_ch: int, norm: str) -> None:
        super().__init__()
        self.theta_x = nn.Sequential(
            nn.Conv2d(x_ch, inter_ch, 1, bias=False), make_norm(norm, inter_ch)
        )
        self.phi_g = nn.Sequential(
            nn.Conv2d(g_ch, inter_ch, 1, bias=False), make_norm(norm, inter_ch)
        )
        self.psi = nn.Sequential(nn.Conv2d(inter_ch, 1, 1), nn.Sigmoid())
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(self.act(self.theta_x(x) + self.phi_g(g)))
        return x * alpha


class Encoder(nn.Module):
    """Contracting path: a block per level, max-pool between levels. Returns all level outputs."""

    def __init__(
        self, in_ch: int, features: Sequence[int], block: type[nn.Module], norm: str, dropout: float
    ) -> None:
        super().__init__()
        widths = [in_ch, *features]
        self.blocks = nn.ModuleList(
            block(widths[i], widths[i + 1], norm, dropout) for i in range(len(features))
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for i, blk in enumerate(self.blocks):
            x = blk(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips
