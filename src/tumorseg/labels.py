"""BraTS label conventions and tumour regions, as data.

Canonical labels inside tumorseg: 0 background, 1 necrotic / non-enhancing core (NCR),
2 edema (ED), 3 enhancing tumour (ET). Each source convention maps its values onto these.
"""

from __future__ import annotations

import numpy as np
import torch

from tumorseg.errors import DataError

CANONICAL = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

# source value -> canonical value
CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2020": {0: 0, 1: 1, 2: 2, 4: 3},  # BraTS 2017-2021: 4 = enhancing
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},  # BraTS 2023+ GLI: 3 = enhancing
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},  # MSD Task01: 1 edema, 2 non-enhancing, 3 enhancing
}

# region -> canonical labels it contains (WT whole tumour, TC tumour core, ET enhancing)
REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}


class LabelError(DataError):
    """A segmentation holds a value its convention does not define."""


def to_canonical(seg: np.ndarray, convention: str, source: str = "<array>") -> np.ndarray:
    """Map a segmentation in ``convention`` to canonical uint8 labels.

    Raises ``LabelError`` naming ``source`` and the first unexpected value.
    """
    mapping = CONVENTIONS[convention]
    values = np.unique(seg)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise LabelError(
            f"{source}: non-integer label value {values[values != np.round(values)][:1]}"
        )
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(mapping))
    if unknown:
        raise LabelError(
            f"{source}: unexpected label value {unknown[0]} for {convention} "
            f"(allowed {sorted(mapping)})"
        )
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[seg.astype(np.int64)]


def from_canonical(seg: np.ndarray, convention: str) -> np.ndarray:
    """Map canonical labels back to ``convention`` (uint8)."""
    lut = np.zeros(4, dtype=np.uint8)
    for src, dst in CONVENTIONS[convention].items():
        lut[dst] = src
    return lut[seg.astype(np.int64)]


def regions_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Canonical labels ``(N, H, W)`` -> boolean regions ``(N, 3, H, W)`` in order WT, TC, ET."""
    return torch.stack(
        [torch.isin(labels, torch.tensor(v, device=labels.device)) for v in REGIONS.values()], 1
    )


def labels_from_regions(regions: torch.Tensor) -> torch.Tensor:
    """Boolean regions ``(N, 3, H, W)`` -> canonical labels: WT as edema, TC as core, ET on top."""
    labels = torch.zeros(regions[:, 0].shape, dtype=torch.uint8, device=regions.device)
    labels[regions[:, 0]] = 2
    labels[regions[:, 1]] = 1
    labels[regions[:, 2]] = 3
    return labels
