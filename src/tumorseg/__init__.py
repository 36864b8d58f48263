"""tumorseg: brain tumour segmentation from multi-modal MRI (BraTS)."""

__version__ = "0.1.0"
