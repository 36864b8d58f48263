"""Preprocessing in one place: what training does to a case, and what inference replays.

``tumorseg-prepare`` (through ``to_store``), the data module (``resize_batch``, ``keep_slices``)
and inference (``NetInput``) all call this module, and a checkpoint records the
``Preprocessing`` it was trained with, so inference never re-derives a step. The steps, in order:

1. **orientation**: the voxel axes are permuted and flipped into ``orientation`` (default LPS,
   the BraTS layout: x runs right to left, y anterior to posterior, z inferior to superior).
   This is lossless; an oblique affine (more than ``OBLIQUE_DEGREES`` off the voxel axes) is
   refused.
2. **in-plane spacing**: slices are resampled (bilinear; labels nearest) to ``spacing`` mm when
   the spacing differs by more than ``SPACING_TOLERANCE``. The through-plane spacing is kept:
   the nets are 2D.
3. **z-score** per modality over brain voxels (any modality non-zero); background stays 0.
4. **crop** (optional): an ``N x N`` in-plane window centred on the brain. For training slices
   the window also moves to hold the whole tumour; at inference there is no tumour to hold.
5. **slice filter**: with ``skip_empty`` set, axial slices whose brain covers less than
   ``min_brain_fraction`` of the training slice area are left out; at inference they are
   background.
6. **resize**: slices are area-resized by ``image_size / slice size`` (the same factor along x
   and y, so nothing is squashed), and the net's output is resized back (bilinear).

Each step has its inverse, applied in reverse order to map a prediction onto the input's grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from tumorseg.core.errors import DataError

ORIENTATION = "LPS"  # the BraTS voxel layout
SPACING = (1.0, 1.0)  # BraTS in-plane spacing, mm
SPACING_TOLERANCE = 0.01  # relative: closer spacings are not resampled
OBLIQUE_DEGREES = 1.0  # largest angle between a voxel axis and a world axis
SKIP_EMPTY = ("none", "brain", "tumour")


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a raw case into the net's input, as recorded in a checkpoint.

    Args:
        orientation: axis codes of the training voxel layout (``LPS``).
        spacing: in-plane voxel size in mm the slices are resampled to.
        crop: side of the in-plane window around the brain, None for the whole slice.
        slice_shape: training slice size (after the crop), the size ``image_size`` scales from.
        image_size: the net's input side for a training slice (None: ``slice_shape`` itself).
        skip_empty: ``none``, ``brain`` or ``tumour`` (training only drops tumour-free slices;
            inference treats it as ``brain``).
        min_brain_fraction: brain pixels a kept slice needs, as a fraction of the slice area.
    """

    orientation: str = ORIENTATION
    spacing: tuple[float, float] = SPACING
    crop: int | None = None
    slice_shape: tuple[int, int] = (240, 240)
    image_size: int | None = None
    skip_empty: str = "brain"
    min_brain_fraction: float = 0.02
    version: int = field(default=1)

    def __post_init__(self) -> None:
        check_orientation(self.orientation)
        if self.skip_empty not in SKIP_EMPTY:
            raise ValueError(f"skip_empty must be one of {SKIP_EMPTY}, got {self.skip_empty!r}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "slice_shape", tuple(int(s) for s in self.slice_shape))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spacing"], out["slice_shape"] = list(self.spacing), list(self.slice_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def slice_area(self) -> int:
        return self.slice_shape[0] * self.slice_shape[1]

    def describe(self) -> str:
        """One line for logs and the README: what inference does to a case."""
        parts = [
            f"orientation {self.orientation}",
            f"in-plane spacing {self.spacing[0]:g}x{self.spacing[1]:g} mm",
            f"crop {self.crop}x{self.crop}" if self.crop else "no crop",
        ]
        if self.image_size:
            parts.append(
                f"slices {self.slice_shape[0]}x{self.slice_shape[1]} -> net "
                f"{self.image_size}x{self.image_size}"
            )
        if self.skip_empty != "none":
            parts.append(f"slices with < {self.min_brain_fraction:g} brain skipped")
        return ", ".join(parts)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels (clipped); None if empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(
            slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis]))
        )
    return tuple(box)


def check_orientation(codes: str) -> None:
    """ValueError unless ``codes`` names each axis once, e.g. ``LPS`` or ``RAS``."""
    axes = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    if len(codes) != 3 or sorted(axes.get(c, -1) for c in codes.upper()) != [0, 1, 2]:
        raise ValueError(f"orientation must be three axis codes such as LPS or RAS, got {codes!r}")


# ---------------------------------------------------------------- 1. orientation


def check_axis_aligned(affine: np.ndarray, source: str) -> None:
    """DataError naming ``source`` when a voxel axis is more than ``OBLIQUE_DEGREES`` off the
    nearest world axis (reorienting would then not be a lossless permutation and flip)."""
    columns = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(columns)):
        raise DataError(f"{source}: affine has a zero or non-finite voxel axis")
    cosines = np.abs(columns / norms).max(axis=0)
    worst = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    if worst > OBLIQUE_DEGREES:
        raise DataError(
            f"{source}: oblique affine ({worst:.1f} degrees off the nearest axis, more than "
            f"{OBLIQUE_DEGREES:g}); resample it onto an axis-aligned grid first"
        )


@dataclass(frozen=True)
class Reorientation:
    """The lossless permutation and flips from a volume's voxel layout to ``orientation``."""

    forward: np.ndarray  # nibabel ornt: source axes -> target
    backward: np.ndarray  # target -> source
    affine: np.ndarray  # affine of the reoriented volume

    @classmethod
    def of(cls, affine: np.ndarray, shape: tuple[int, ...], orientation: str) -> Reorientation:
        src = nib.orientations.io_orientation(affine)
        dst = nib.orientations.axcodes2ornt(tuple(orientation.upper()))
        forward = nib.orientations.ornt_transform(src, dst)
        backward = nib.orientations.ornt_transform(dst, src)
        new_affine = affine @ nib.orientations.inv_ornt_aff(forward, shape[:3])
        return cls(forward, backward, new_affine)

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.forward, [[0, 1], [1, 1], [2, 1]]))

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` or ``(C, X, Y, Z)`` into the target layout."""
        return self._move(volume, self.forward)

    def undo(self, volume: np.ndarray) -> np.ndarray:
        return self._move(volume, self.backward)

    def _move(self, volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
        if self.identity:
            return volume
        if volume.ndim == 4:
            return np.stack([nib.orientations.apply_orientation(v, ornt) for v in volume])
        return nib.orientations.apply_orientation(volume, ornt)


# ---------------------------------------------------------------- 2. spacing


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each voxel axis, mm."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def needs_resampling(spacing: tuple[float, ...], target: tuple[float, ...]) -> bool:
    return any(abs(s / t - 1) > SPACING_TOLERANCE for s, t in zip(spacing, target, strict=True))


def resampled_shape(
    shape: tuple[int, int], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int]:
    """In-plane size covering the same extent at ``target`` spacing."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def resample_slices(volume: np.ndarray, shape: tuple[int, int], labels: bool = False) -> np.ndarray:
    """``(C, X, Y, Z)`` float (bilinear) or ``(X, Y, Z)`` labels (nearest) to in-plane ``shape``;
    pixel centres keep their physical place (``align_corners=False``)."""
    if tuple(volume.shape[-3:-1]) == tuple(shape):
        return volume
    if labels:
        rows = np.minimum(
            ((np.arange(shape[0]) + 0.5) * volume.shape[0] / shape[0]).astype(int),
            volume.shape[0] - 1,
        )
        cols = np.minimum(
            ((np.arange(shape[1]) + 0.5) * volume.shape[1] / shape[1]).astype(int),
            volume.shape[1] - 1,
        )
        return np.ascontiguousarray(volume[rows][:, cols])
    x = torch.from_numpy(np.ascontiguousarray(volume.transpose(3, 0, 1, 2)))  # (Z, C, X, Y)
    out = F.interpolate(x.float(), size=tuple(shape), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(out.numpy().transpose(1, 2, 3, 0))


# ---------------------------------------------------------------- 3. intensities


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any modality of ``(C, ...)`` is non-zero."""
    return (image != 0).any(0)


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-modality z-score over brain voxels (any modality non-zero); background stays 0."""
    brain = brain_mask(image)
    out = np.zeros_like(image, dtype=np.float32)
    if not brain.any():
        return out
    # Index inside the brain's bounding box only: the same voxels in the same order (so the
    # same mean and std to the bit) without scanning the background around the head.
    inside = bounding_box(brain, margin=0) or ()
    brain, src, dst = brain[inside], image[(slice(None), *inside)], out[(slice(None), *inside)]
    for c in range(image.shape[0]):
        values = src[c][brain]
        dst[c][brain] = (values - values.mean()) / max(float(values.std()), 1e-6)
    return out


# ---------------------------------------------------------------- 4. crop


def _axis_start(size: int, n: int, brain: np.ndarray, tumour: np.ndarray | None) -> tuple[int, str]:
    """Start of an ``n`` wide window along one axis: centred on the brain, holding the tumour
    when one is given. Returns the start and, when the tumour is wider than ``n``, the problem."""
    lo, hi = (min(0, size - n), max(0, size - n))  # window inside the image, or covering it
    if brain.any():
        b = np.flatnonzero(brain)
        start = int(round((b[0] + b[-1] + 1) / 2 - n / 2))
    else:
        start = (size - n) // 2
    start = min(max(start, lo), hi)
    if tumour is not None and tumour.any():
        t = np.flatnonzero(tumour)
        extent = int(t[-1] - t[0] + 1)
        if extent > n:
            return start, f"tumour spans {extent} voxels, more than --crop {n}"
        start = min(start, int(t[0]))  # move the window to take in the whole tumour
        start = max(start, int(t[-1]) - n + 1)
    return start, ""


def crop_origin(
    brain: np.ndarray, tumour: np.ndarray | None, n: int, case_id: str
) -> tuple[int, int]:
    """In-plane window origin for ``brain`` (and training ``tumour``) masks ``(X, Y, Z)``;
    DataError naming the case when its tumour does not fit in ``n x n``."""
    origin = []
    for axis, name in ((0, "x"), (1, "y")):
        other = tuple(a for a in range(3) if a != axis)
        part = None if tumour is None else tumour.any(other)
        start, problem = _axis_start(brain.shape[axis], n, brain.any(other), part)
        if problem:
            raise DataError(f"{case_id}: {problem} along {name}")
        origin.append(start)
    return origin[0], origin[1]


def window(array: np.ndarray, origin: tuple[int, int], n: int, axes: tuple[int, int]) -> np.ndarray:
    """``n x n`` window of ``array`` over ``axes`` at ``origin``; outside the array is zero."""
    shape = list(array.shape)
    src, dst = [slice(None)] * array.ndim, [slice(None)] * array.ndim
    for axis, start in zip(axes, origin, strict=True):
        shape[axis] = n
        a, b = max(start, 0), min(start + n, array.shape[axis])
        src[axis], dst[axis] = slice(a, b), slice(a - start, b - start)
    out = np.zeros(shape, dtype=array.dtype)
    out[tuple(dst)] = array[tuple(src)]
    return out


def unwindow(
    part: torch.Tensor, origin: tuple[int, int], shape: tuple[int, int], fill: torch.Tensor
) -> torch.Tensor:
    """Inverse of ``window`` for ``(N, C, n, n)`` tensors: placed at ``origin`` in a plane of
    ``shape`` whose other pixels hold ``fill`` (a per-channel value, shape ``(C,)``)."""
    n_h, n_w = part.shape[-2:]
    out = fill.to(part).view(1, -1, 1, 1).expand(part.shape[0], -1, *shape).clone()
    a = [max(o, 0) for o in origin]
    b = [min(o + n, s) for o, n, s in zip(origin, (n_h, n_w), shape, strict=True)]
    out[..., a[0] : b[0], a[1] : b[1]] = part[
        ..., a[0] - origin[0] : b[0] - origin[0], a[1] - origin[1] : b[1] - origin[1]
    ]
    return out


# ---------------------------------------------------------------- 5. slice filter


def keep_slices(brain: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Boolean keep mask from per-slice brain pixel counts on the training slice grid."""
    brain = np.asarray(brain)
    if pre.skip_empty == "none":
        return np.ones(len(brain), dtype=bool)
    return brain >= pre.min_brain_fraction * pre.slice_area


# ---------------------------------------------------------------- 6. resize


def resize_batch(
    image: torch.Tensor, labels: torch.Tensor, size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batches: area-resize ``image (N, C, H, W)`` and nearest-resize ``labels (N, H,
    W)`` to ``size x size`` (store slices are square, so the factor is the same along x and y)."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image, labels
    image = F.interpolate(image, size=(size, size), mode="area")
    h, w = labels.shape[-2:]
    # nearest-exact: output pixel i takes input floor((i + 0.5) * in / out)
    rows = ((torch.arange(size) + 0.5) * h / size).long()
    cols = ((torch.arange(size) + 0.5) * w / size).long()
    return image, labels[:, rows][:, :, cols]


def net_shape(shape: tuple[int, int], pre: Preprocessing, step: int) -> tuple[tuple, tuple]:
    """``(padded, net)`` sizes for slices of in-plane ``shape`` on the training grid.

    The slice is zero-padded at the end to ``padded`` and then area-resized to ``net`` with the
    training factor ``image_size / slice_shape`` along each axis, chosen so that ``net`` is a
    multiple of ``step`` and the factor is exact. A training-sized slice is not padded, so
    inference repeats training's resize exactly.
    """
    padded, net = [], []
    for n, trained in zip(shape, pre.slice_shape, strict=True):
        if pre.image_size is None:
            p = n + (-n) % step
            padded.append(p)
            net.append(p)
            continue
        out, p = pre.image_size, n
        while (p * out) % trained or ((p * out) // trained) % step:
            p += 1
        padded.append(p)
        net.append(p * out // trained)
    return tuple(padded), tuple(net)


def to_net(x: torch.Tensor, padded: tuple[int, int], net: tuple[int, int]) -> torch.Tensor:
    """Slices ``(N, C, H, W)`` padded to ``padded`` and area-resized to ``net``."""
    pad_h, pad_w = padded[0] - x.shape[-2], padded[1] - x.shape[-1]
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    if tuple(x.shape[-2:]) != tuple(net):
        x = F.interpolate(x, size=tuple(net), mode="area")
    return x


def from_net(logits: torch.Tensor, padded: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``to_net`` for float logits: bilinear resize to ``padded``, padding cut off."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(padded):
        logits = F.interpolate(logits, size=tuple(padded), mode="bilinear", align_corners=False)
    return logits[..., : shape[0], : shape[1]]


def preprocessing_from_config(config: dict | None) -> Preprocessing:
    """The preprocessing of a run config, for checkpoints that predate its recording (BraTS
    orientation and 1 mm spacing; the crop, resize and slice filter of ``data``)."""
    data = (config or {}).get("data") or {}
    crop = data.get("crop")
    skip = data.get("skip_empty", "brain")
    skip = {True: "brain", False: "none", None: "none"}.get(skip, skip)
    return Preprocessing(
        crop=crop,
        slice_shape=(crop, crop) if crop else (240, 240),
        image_size=data.get("image_size"),
        skip_empty=skip,
        min_brain_fraction=data.get("min_brain_fraction", 0.02),
    )


# ---------------------------------------------------------------- the training side


@dataclass
class OnGrid:
    """A case after steps 1-2 (orientation, in-plane spacing), and how it got there."""

    image: np.ndarray  # (C, X', Y', Z) on the training grid
    seg: np.ndarray | None  # (X', Y', Z) labels, when the case has them
    affine: np.ndarray  # of the training grid
    turn: Reorientation  # step 1, which ``NetInput.undo`` reverses
    oriented: tuple[int, int, int]  # (X, Y, Z) after step 1, before resampling


def to_training_grid(
    image: np.ndarray, seg: np.ndarray | None, affine: np.ndarray, pre: Preprocessing, source: str
) -> OnGrid:
    """Steps 1-2, for the store (``prepare``) and for inference (``NetInput``) alike."""
    check_axis_aligned(affine, source)
    turn = Reorientation.of(affine, image.shape[1:], pre.orientation)
    image, affine = turn.apply(image), turn.affine
    seg = None if seg is None else turn.apply(seg)
    oriented = tuple(image.shape[1:])
    spacing = voxel_spacing(affine)[:2]
    if needs_resampling(spacing, pre.spacing):
        shape = resampled_shape(image.shape[1:3], spacing, pre.spacing)
        image = resample_slices(image, shape)
        seg = None if seg is None else resample_slices(seg, shape, labels=True)
        affine = affine.copy()
        for axis in (0, 1):
            affine[:3, axis] *= pre.spacing[axis] / spacing[axis]
    return OnGrid(image, seg, affine, turn, oriented)


# ---------------------------------------------------------------- the inference side


@dataclass
class NetInput:
    """A raw case replayed through steps 1-5, and the way back onto its own grid.

    ``image`` is ``(Z, C, H, W)`` of the kept slices ``keep``, ready for ``to_net``;
    ``back(probs, fill)`` maps probabilities of those slices ``(N, C, H, W)`` onto the input's
    in-plane grid (still in the training orientation; ``undo`` finishes the way back).
    """

    image: torch.Tensor
    keep: np.ndarray
    turn: Reorientation
    oriented: tuple[int, int, int]  # (X, Y, Z) after reorientation, before resampling
    resampled: tuple[int, int]  # in-plane size on the training spacing
    origin: tuple[int, int] | None  # crop window origin on the resampled grid
    pre: Preprocessing

    @classmethod
    def of(
        cls,
        image: np.ndarray,
        affine: np.ndarray,
        pre: Preprocessing,
        source: str,
        normalised: bool = False,
    ) -> NetInput:
        """``image (C, X, Y, Z)`` raw (``normalised``: already z-scored, e.g. a store volume)."""
        grid = to_training_grid(image, None, affine, pre, source)
        image, turn, oriented = grid.image, grid.turn, grid.oriented
        resampled = tuple(image.shape[1:3])
        if not normalised:
            image = zscore(image)
        origin = None
        if pre.crop:
            origin = crop_origin(brain_mask(image), None, pre.crop, source)
            image = window(image, origin, pre.crop, (1, 2))
        brain = brain_mask(image).sum((0, 1))
        keep = np.flatnonzero(keep_slices(brain, pre) & (brain > 0))
        slices = np.ascontiguousarray(image.transpose(3, 0, 1, 2)[keep])
        return cls(torch.from_numpy(slices), keep, turn, oriented, resampled, origin, pre)

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])

    @property
    def identity_back(self) -> bool:
        """Whether ``back`` returns its input as it is (no crop, no resampling)."""
        return self.origin is None and tuple(self.resampled) == tuple(self.oriented[:2])

    def back(self, probs: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(N, C, H, W)`` on the net-input slice grid -> the oriented input grid."""
        if self.origin is not None:
            probs = unwindow(probs, self.origin, self.resampled, fill)
        if tuple(self.resampled) != tuple(self.oriented[:2]):
            probs = F.interpolate(
                probs, size=tuple(self.oriented[:2]), mode="bilinear", align_corners=False
            )
        return probs

    def undo(self, labels: np.ndarray) -> np.ndarray:
        """Labels ``(X, Y, Z)`` in the training orientation -> the input's voxel layout."""
        return self.turn.undo(labels)
