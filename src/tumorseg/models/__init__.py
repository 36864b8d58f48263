"""U-Net variants that share one constructor signature."""

from tumorseg.models.attention_unet import AttentionUNet
from tumorseg.models.residual_unet import ResidualUNet
from tumorseg.models.unet import UNet

__all__ = ["AttentionUNet", "ResidualUNet", "UNet"]
