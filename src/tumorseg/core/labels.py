"""BraTS label conventions and tumour regions, as data.

Canonical labels inside tumorseg: 0 background, 1 necrotic / non-enhancing core (NCR),
2 edema (ED), 3 enhancing tumour (ET). Each source convention maps its values onto these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tumorseg.core.errors import DataError

CANONICAL = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

# source value -> canonical value
CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2020": {0: 0, 1: 1, 2: 2, 4: 3},  # BraTS 2017-2021: 4 = enhancing
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},  # BraTS 2023+ GLI: 3 = enhancing
    # BraTS 2024 GLI (post-treatment) adds 4 = resection cavity. A cavity is not tumour, so it
    # maps to background: it counts in none of WT/TC/ET and is lost on the way back.
    "brats2024": {0: 0, 1: 1, 2: 2, 3: 3, 4: 0},
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},  # MSD Task01: 1 edema, 2 non-enhancing, 3 enhancing
}

# Kaggle "BraTS2020 training data" h5 masks: one-hot channels, by default (NCR, ED, ET), i.e.
# channel 0 necrotic/non-enhancing core = BraTS 1, 1 edema = 2, 2 enhancing = 4. The order is
# undocumented; ``tumorseg-channels`` checks it and ``mask_order`` changes it.
MASK_LABELS = {"ncr": 1, "ed": 2, "et": 3}  # mask channel name -> canonical label
MASK_ORDER = ("ncr", "ed", "et")
ONE_HOT_LABELS = tuple(MASK_LABELS[name] for name in MASK_ORDER)


def check_mask_order(order: tuple[str, ...] | list[str], source: str = "mask_order") -> tuple:
    """``order`` as a tuple naming ncr, ed and et once each (LabelError otherwise)."""
    names = tuple(str(n).strip().lower() for n in order)
    if sorted(names) != sorted(MASK_ORDER):
        raise LabelError(f"{source}: must name each of ncr, ed, et once, got {list(order)}")
    return names


# Region -> label values in the files of each label convention (names as in
# ``CONVENTIONS``; "canonical" is tumorseg's own 1 NCR, 2 ED, 3 ET). NETC is
# the necrotic / non-enhancing core (BraTS 2020 "NCR/NET"), SNFH the surrounding FLAIR
# hyperintensity (edema), RC the resection cavity of the BraTS 2024 post-treatment data.
REGIONS_BY_CONVENTION: dict[str, dict[str, tuple[int, ...]]] = {
    "canonical": {"netc": (1,), "snfh": (2,), "et": (3,), "tc": (1, 3), "wt": (1, 2, 3)},
    "brats2020": {"netc": (1,), "snfh": (2,), "et": (4,), "tc": (1, 4), "wt": (1, 2, 4)},
    "brats2023": {"netc": (1,), "snfh": (2,), "et": (3,), "tc": (1, 3), "wt": (1, 2, 3)},
    "brats2024": {
        "netc": (1,),
        "snfh": (2,),
        "et": (3,),
        "rc": (4,),
        "tc": (1, 3),
        "wt": (1, 2, 3),
    },
    "msd": {"netc": (2,), "snfh": (1,), "et": (3,), "tc": (2, 3), "wt": (1, 2, 3)},
}

# The three BraTS regions (WT whole tumour, TC tumour core, ET enhancing) -> canonical labels:
# what the net predicts, training scores and the reports compare.
REGIONS: dict[str, tuple[int, ...]] = {
    r: REGIONS_BY_CONVENTION["canonical"][r] for r in ("wt", "tc", "et")
}


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
        hint = ""
        if convention == "brats2023" and unknown == [4]:
            hint = "; BraTS 2024 data with resection cavity (4): use convention brats2024"
        raise LabelError(
            f"{source}: unexpected label value {unknown[0]} for {convention} "
            f"(allowed {sorted(mapping)}{hint})"
        )
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[seg.astype(np.int64)]


def from_canonical(seg: np.ndarray, convention: str) -> np.ndarray:
    """Map canonical labels back to ``convention`` (uint8).

    Where several source values share a canonical one (brats2024: 0 and 4 are background),
    the first listed wins, so background maps back to 0.
    """
    lut = np.zeros(4, dtype=np.uint8)
    for src, dst in reversed(CONVENTIONS[convention].items()):
        lut[dst] = src
    return lut[seg.astype(np.int64)]


def from_one_hot(
    mask: np.ndarray, source: str = "<array>", order: tuple[str, ...] = MASK_ORDER
) -> np.ndarray:
    """Kaggle one-hot mask ``(..., 3)`` with channels named by ``order`` (default NCR, ED, ET)
    -> canonical uint8 labels ``(...)``.

    Raises ``LabelError`` naming ``source`` when a value is not 0/1 or a pixel has two
    channels set (the channels are mutually exclusive).
    """
    if mask.shape[-1:] != (len(ONE_HOT_LABELS),):
        raise LabelError(f"{source}: mask has shape {mask.shape}, expected (..., 3)")
    if mask.dtype != bool and (mask.min() < 0 or mask.max() > 1):
        bad = np.unique(mask[(mask != 0) & (mask != 1)])[:3].tolist()
        raise LabelError(f"{source}: mask is not one-hot (values {bad}, expected 0/1)")
    # Per-channel uint8 planes: sums over a length-3 last axis are slow in numpy.
    planes = [mask[..., k].astype(np.uint8) for k in range(len(ONE_HOT_LABELS))]
    count = sum(planes)
    if count.max(initial=0) > 1:
        where = tuple(int(i) for i in np.argwhere(count > 1)[0])
        raise LabelError(
            f"{source}: mask is not one-hot ({int((count > 1).sum())} pixels with "
            f"two or more channels set, first at {where})"
        )
    labels = np.zeros(mask.shape[:-1], dtype=np.uint8)
    for plane, label in zip(planes, (MASK_LABELS[n] for n in order), strict=True):
        labels += plane * np.uint8(label)
    return labels


def regions_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Canonical labels ``(N, H, W)`` -> boolean regions ``(N, 3, H, W)`` in order WT, TC, ET."""
    return torch.stack(
        [torch.isin(labels, torch.tensor(v, device=labels.device)) for v in REGIONS.values()], 1
    )


def labels_from_regions(regions: torch.Tensor) -> torch.Tensor:
    """Boolean regions ``(N, 3, H, W)`` -> canonical labels, painted in ``PAINT_ORDER``."""
    labels = torch.zeros(regions[:, 0].shape, dtype=torch.uint8, device=regions.device)
    for (_region, label), channel in zip(PAINT_ORDER, regions.unbind(1), strict=True):
        labels[channel] = label
    return labels


# ---------------------------------------------------------------- what the net predicts

# Paint order when regions become labels: WT as edema, then TC as core, then ET on top.
PAINT_ORDER: tuple[tuple[str, int], ...] = (("wt", 2), ("tc", 1), ("et", 3))


@dataclass(frozen=True)
class Target:
    """What a net's output channels mean, and how they become labels.

    ``regions``: one sigmoid channel per region (WT, TC, ET), a region where its probability
    exceeds 0.5, painted into labels in ``PAINT_ORDER``. ``labels``: softmax over the four
    canonical labels, the most probable label wins. Training metrics, inference and the
    test stage all decide through this one object.
    """

    name: str
    channels: int

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` -> probabilities."""
        if self.name == "regions":
            return torch.sigmoid(logits)
        return torch.softmax(logits, 1)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(N, C, H, W)`` -> canonical labels ``(N, H, W)`` uint8."""
        if self.name == "regions":
            return labels_from_regions(probs > 0.5)
        return probs.argmax(1).to(torch.uint8)

    def regions(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> boolean regions ``(N, 3, H, W)``, as ``decide`` would give them."""
        if self.name == "regions":
            return logits > 0  # sigmoid(x) > 0.5
        return regions_from_labels(logits.argmax(1))

    def background(self) -> torch.Tensor:
        """Per-channel probabilities of a pixel the net never saw: background."""
        fill = torch.zeros(self.channels)
        if self.name == "labels":
            fill[0] = 1.0
        return fill


TARGETS: dict[str, Target] = {"regions": Target("regions", 3), "labels": Target("labels", 4)}


def target(name: str) -> Target:
    """The ``Target`` called ``name`` (ValueError naming the choices otherwise)."""
    if name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}")
    return TARGETS[name]
