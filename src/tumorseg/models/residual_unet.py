"""Residual U-Net: U-Net with residual blocks (He et al. 2016) in encoder and decoder."""

from __future__ import annotations

from tumorseg.models.blocks import ResidualBlock
from tumorseg.models.unet import UNet


class ResidualUNet(UNet):
    """U-Net whose blocks are residual, with 1x1 projection shortcuts where widths change.

    Same arguments, shapes and size rule as :class:`tumorseg.models.unet.UNet`.
    """

    block = ResidualBlock
