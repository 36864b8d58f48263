"""U-Net variants that share one constructor signature: :class:`UNet`, :class:`AttentionUNet`
and :class:`ResidualUNet`, built from :mod:`.blocks`.

May import only ``tumorseg.core``.
"""

from tumorseg.models.attention_unet import AttentionUNet
from tumorseg.models.residual_unet import ResidualUNet
from tumorseg.models.unet import UNet

__all__ = ["AttentionUNet", "ResidualUNet", "UNet"]
