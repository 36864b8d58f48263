"""The canonical case every reader returns (:class:`Case`), the facts every source shares
(``MODALITIES``, the standard BraTS grid ``BRATS_AFFINE``) and reading NIfTI files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tumorseg.core.errors import DataError
from tumorseg.core.labels import to_canonical

MODALITIES = ("flair", "t1", "t1ce", "t2")
SUFFIXES = (".nii.gz", ".nii")
# The standard BraTS grid (LPS, 1 mm, 240 x 240 x 155) of the SRI24 atlas; the Kaggle h5 slices
# carry no geometry and get it, the demo writes it.
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


@dataclass
class Case:
    """One patient: modalities in ``MODALITIES`` order, canonical labels (None when unlabelled)."""

    case_id: str
    image: np.ndarray  # (4, X, Y, Z) float32
    seg: np.ndarray | None  # (X, Y, Z) uint8, canonical labels 0..3
    affine: np.ndarray  # (4, 4)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


def find_nifti(folder: Path, stem: str) -> Path | None:
    """`folder/stem.nii.gz`, else `folder/stem.nii`, else None."""
    for suffix in SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.exists():
            return path
    return None


def read_nifti(path: Path, dtype: type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array and affine of a NIfTI file; any read failure becomes a DataError."""
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as err:  # nibabel, gzip and zlib raise several types for broken files
        raise DataError(f"{path}: cannot read NIfTI ({err})") from None
    return data, img.affine


def read_images(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 3D modality files into ``(len(paths), X, Y, Z)`` float32 and return their affine.

    Each file must be a finite 3D volume with the shape and affine of the first one.
    """
    arrays, affine, shape, ref = [], None, None, None
    for path in paths:
        data, aff = read_nifti(path)
        if data.ndim != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
        if not np.isfinite(data).all():
            raise DataError(f"{path}: NaN or inf voxels")
        if shape is None:
            shape, affine, ref = data.shape, aff, path
        elif data.shape != shape or not np.allclose(aff, affine, atol=1e-3):
            raise DataError(f"{path}: shape/affine {data.shape} differs from {ref.name} {shape}")
        arrays.append(data)
    return np.stack(arrays), np.asarray(affine)


def read_seg(path: Path, shape: tuple[int, ...], ref: str, convention: str) -> np.ndarray:
    """Canonical labels of a segmentation file (integer or integral float) of ``shape``."""
    raw, _ = read_nifti(path, dtype=None)
    if raw.shape != shape:
        raise DataError(f"{path}: shape {raw.shape} differs from {ref} {shape}")
    return to_canonical(raw, convention, str(path))
