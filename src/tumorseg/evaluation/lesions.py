"""Lesion-wise and global BraTS metrics, defined as the official BraTS evaluator defines them.

The official evaluator is the ``BraTS-evaluation`` package with its ``gli`` config, built on
``panoptica``. This module reproduces its numbers in numpy/scipy, in millimetres throughout.
Nothing is computed on the whole volume: the case is cropped to the bounding box of its labels
(plus a margin), each lesion's surface is found inside its own bounding box, and distances are
measured between surface voxels with a k-d tree rather than with distance transforms of the
volume (``crop=False`` does the latter: the same numbers, 40-100x slower on a BraTS case;
``python -m tumorseg.bench.scoring`` measures both).

Per region (a set of label values, e.g. TC = NETC + ET):

* **Lesions** are the 26-connected components of the reference and of the prediction.
* **Matching** is one-to-one, by maximum bipartite matching on lesion Dice: pairs with Dice
  >= 1e-6 cost ``1 - Dice``, others can not match; the assignment with the lowest total cost
  (``scipy.optimize.linear_sum_assignment``) wins. Matched reference lesions are *matched*,
  the other reference lesions *missed*, the other predicted lesions *false*.
* **Per-lesion** Dice, NSD and HD95 compare a reference lesion with its matched predicted
  lesion only.
* **Global** Dice, NSD and HD95 compare the whole region masks.

Surfaces are the mask minus its erosion with the 6-neighbourhood; a surface voxel's distance is
the Euclidean distance (mm) to the nearest surface voxel of the other mask.

* **NSD** (normalised surface distance, a surface Dice) at tolerance ``t`` mm: the mean of the
  two fractions "reference surface within ``t`` of the predicted surface" and "predicted surface
  within ``t`` of the reference surface" (panoptica's formula; the surface Dice of Nikolov et
  al. pools the two counts instead).
* **HD95**, two conventions: ``pooled`` takes the 95th percentile of both directions' distances
  pooled together (panoptica, MedPy); ``max`` takes the larger of the two directed 95th
  percentiles (MONAI, DeepMind's ``surface-distance``).

Edge cases, as the official evaluator:

* global: both masks empty -> NaN for all three; no overlap (one empty, or disjoint) -> Dice 0,
  NSD 0, HD95 infinite;
* lesion-wise score (``lesion_*``, the official ``lesionwise_*_mean``): the mean over matched
  lesions; no matched lesion -> NaN when neither side has a lesion, else Dice 0, NSD 0, HD95
  infinite;
* penalised lesion-wise score (``penalised_*``; the rule of the BraTS 2023 lesion-wise
  evaluation, the official package's ``mets`` parser with volume threshold 0): every missed and
  every false lesion adds Dice 0, NSD 0 and HD95 373 to the mean; NaN without reference lesions.

The official reports write an infinite HD95 as 373 mm (the diagonal of the SRI-24 atlas
volume): :func:`reported` does the same, and tumorseg applies it to every HD95 it writes
(``lesion_hd95`` too, where the official ``lesionwise_hd95_mean`` keeps infinity).

Tolerances: by default (``nsd_tolerance=None``) per-lesion NSD uses the smallest voxel spacing
(1 mm on BraTS data), as panoptica does, and global NSD half of it, which counts only surface
voxels that coincide: the official evaluator calls its global metrics without the spacing, so
its global tolerance is panoptica's fallback of 0.5 voxel. A number sets both tolerances in mm.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from tumorseg.core.labels import REGIONS_BY_CONVENTION
from tumorseg.data.preprocess import bounding_box

Hd95Convention = Literal["pooled", "max"]
HD95_CONVENTIONS: tuple[str, ...] = ("pooled", "max")
MATCH_THRESHOLD = 1e-6  # minimum lesion Dice for a match (the gli config)
REPORTED_INF = 373.0  # mm; what the official reports write for an infinite HD95
MARGIN = 1  # voxels around a bounding box (distances inside it equal those on the volume)

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Lesion:
    """One lesion of a region: a matched pair, a missed reference or a false prediction.

    ``ref_id`` / ``pred_id`` number the connected components of the reference and prediction
    (1-based, raster order of the whole volume; 0: none). ``centre`` is the voxel index of the
    lesion's centre of mass (the reference lesion's where there is one). Missed and false
    lesions have Dice 0, NSD 0 and HD95 infinite.
    """

    status: Literal["matched", "missed", "false"]
    ref_id: int
    pred_id: int
    ref_voxels: int
    pred_voxels: int
    volume_mm3: float
    centre: tuple[int, ...]
    dsc: float
    nsd: float
    hd95: float


@dataclass(frozen=True)
class RegionScore:
    """Global and lesion-wise metrics of one region of one case (see the module docstring)."""

    region: str
    hd95_convention: str
    n_ref: int
    n_pred: int
    matched: int
    missed: int
    false: int
    dsc: float
    nsd: float
    hd95: float
    lesion_dsc: float
    lesion_nsd: float
    lesion_hd95: float
    penalised_dsc: float
    penalised_nsd: float
    penalised_hd95: float
    lesions: tuple[Lesion, ...] = field(default=())

    METRICS = (
        "n_ref",
        "n_pred",
        "matched",
        "missed",
        "false",
        "dsc",
        "nsd",
        "hd95",
        "lesion_dsc",
        "lesion_nsd",
        "lesion_hd95",
        "penalised_dsc",
        "penalised_nsd",
        "penalised_hd95",
    )

    def row(self, report: bool = True) -> dict[str, float | int]:
        """The metrics as a flat dict; ``report``: global HD95 infinity written as 373."""
        out = {name: getattr(self, name) for name in self.METRICS}
        if report:
            out["hd95"] = reported(self.hd95)
        return out


def reported(value: float) -> float:
    """An HD95 as the official reports write it: infinity -> 373 (mm), anything else as is."""
    return REPORTED_INF if math.isinf(value) else value


# ---------------------------------------------------------------- geometry


def _union(a: tuple[slice, ...], b: tuple[slice, ...], shape: Sequence[int], margin: int):
    return tuple(
        slice(max(min(x.start, y.start) - margin, 0), min(max(x.stop, y.stop) + margin, n))
        for x, y, n in zip(a, b, shape, strict=True)
    )


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion with the 6-neighbourhood (3D)."""
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1))


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``(d_ref, d_pred)``: for each reference surface voxel the distance (mm) to the nearest
    predicted surface voxel, and for each predicted surface voxel the distance to the nearest
    reference surface voxel, from Euclidean distance transforms of the whole arrays (what
    panoptica and MedPy do). Both masks must be non-empty."""
    pred_surface, ref_surface = surface(pred), surface(ref)
    sampling = np.asarray(spacing, dtype=np.float64)
    d_ref = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    d_pred = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    return d_ref, d_pred


def nearest_distances(points: np.ndarray, targets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel index in ``points`` (n, 3) to the nearest in ``targets``.

    A k-d tree finds the nearest target; the distance is then computed from the integer index
    difference exactly as scipy's distance transform computes it, so the floats agree."""
    _, k = cKDTree(targets * spacing).query(points * spacing)
    diff = (targets[k] - points).astype(np.float64) * spacing
    return np.sqrt(np.add.reduce(diff * diff, axis=1))


def _component_surfaces(lab: np.ndarray, boxes: list) -> list[np.ndarray]:
    """Surface voxel indices (n, 3) of each labelled component, each found inside its own
    bounding box plus a margin. A 26-connected component's 6-neighbours are its own voxels
    or background, so the union of these is the surface of the whole mask."""
    out = []
    for k, box in enumerate(boxes, start=1):
        sub = _union(box, box, lab.shape, MARGIN)
        starts = np.array([x.start for x in sub])
        out.append(np.argwhere(surface(lab[sub] == k)) + starts)
    return out


def hd95_from(d_ref: np.ndarray, d_pred: np.ndarray, convention: Hd95Convention) -> float:
    """95th percentile Hausdorff distance from the two directed surface distance arrays."""
    if convention == "pooled":
        return float(np.percentile(np.concatenate([d_ref, d_pred]), 95))
    if convention == "max":
        return float(max(np.percentile(d_ref, 95), np.percentile(d_pred, 95)))
    raise ValueError(f"unknown HD95 convention {convention!r}: use one of {HD95_CONVENTIONS}")


def nsd_from(d_ref: np.ndarray, d_pred: np.ndarray, tolerance: float) -> float:
    """Normalised surface distance at ``tolerance`` mm: the mean of the two directed fractions
    within tolerance (written as panoptica writes it, so the floats agree)."""
    tp_a = np.count_nonzero(d_ref <= tolerance) / d_ref.size
    tp_b = np.count_nonzero(d_pred <= tolerance) / d_pred.size
    fp = np.count_nonzero(d_ref > tolerance) / d_ref.size
    fn = np.count_nonzero(d_pred > tolerance) / d_pred.size
    return float((tp_a + tp_b) / (tp_a + tp_b + fp + fn + sys.float_info.min))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (0 when both are empty; callers handle that case first)."""
    total = np.count_nonzero(pred) + np.count_nonzero(ref)
    return 2.0 * np.count_nonzero(pred & ref) / total if total else 0.0


def _reduce(
    d_ref: np.ndarray, d_pred: np.ndarray, tolerance: float, convention: Hd95Convention
) -> tuple[float, float]:
    return nsd_from(d_ref, d_pred, tolerance), hd95_from(d_ref, d_pred, convention)


# ---------------------------------------------------------------- scoring


def _check(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3D volumes, got shape {pred.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {spacing} must be three positive numbers (mm per axis)")
    return spacing


def _tolerances(nsd_tolerance: float | None, spacing: Sequence[float]) -> tuple[float, float]:
    """(global, per-lesion) NSD tolerance in mm."""
    if nsd_tolerance is None:
        return 0.5 * min(spacing), min(spacing)
    if not nsd_tolerance >= 0:
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {nsd_tolerance}")
    return float(nsd_tolerance), float(nsd_tolerance)


def _match(
    ref_lab: np.ndarray, n_ref: int, pred_lab: np.ndarray, n_pred: int, sizes_ref, sizes_pred
) -> list[tuple[int, int, float]]:
    """``[(ref_id, pred_id, dice)]``: maximum bipartite matching on Dice >= 1e-6."""
    if n_ref == 0 or n_pred == 0:
        return []
    both = (ref_lab > 0) & (pred_lab > 0)
    keys = ref_lab[both].astype(np.int64) * (n_pred + 1) + pred_lab[both]
    pairs, inter = np.unique(keys, return_counts=True)
    r, p = np.divmod(pairs, n_pred + 1)
    scores = 2.0 * inter / (sizes_ref[r] + sizes_pred[p])
    cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
    ok = scores >= MATCH_THRESHOLD
    cost[r[ok] - 1, p[ok] - 1] = 1.0 - scores[ok]
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < 1.0
    score = dict(zip(zip(r.tolist(), p.tolist(), strict=True), scores.tolist(), strict=True))
    return [
        (i + 1, j + 1, score[(i + 1, j + 1)]) for i, j in zip(rows[keep], cols[keep], strict=True)
    ]


def _mean(values: list[float]) -> float:
    return float(np.average(values))


def score_region(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    region: str = "",
    nsd_tolerance: float | None = None,
    hd95: Hd95Convention = "pooled",
    crop: bool = True,
    origin: Sequence[int] = (0, 0, 0),
) -> RegionScore:
    """Global and lesion-wise metrics of one region: ``pred`` and ``ref`` are boolean 3D masks
    of the same shape, ``spacing`` the voxel size in mm along each array axis.

    ``crop=False`` computes everything on the whole volume with distance transforms (the same
    numbers, much slower; the benchmark's baseline). ``origin`` is the index of ``pred[0, 0, 0]``
    in the full volume when the masks are a crop of it (lesion centres are given in the full
    volume)."""
    spacing = _check(pred, ref, spacing)
    if hd95 not in HD95_CONVENTIONS:
        raise ValueError(f"unknown HD95 convention {hd95!r}: use one of {HD95_CONVENTIONS}")
    tol_global, tol_lesion = _tolerances(nsd_tolerance, spacing)
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    if crop:
        box = bounding_box(pred | ref, MARGIN)
        if box is None:  # both empty: one voxel is enough to find nothing
            box = (slice(0, 1),) * 3
    else:
        box = tuple(slice(0, n) for n in pred.shape)
    origin = np.asarray(origin) + np.array([s.start for s in box])
    p, r = pred[box], ref[box]

    # lesions
    ref_lab, n_ref = ndimage.label(r, _CONNECTIVITY_26)
    pred_lab, n_pred = ndimage.label(p, _CONNECTIVITY_26)
    sizes_ref = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    sizes_pred = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    boxes_ref = ndimage.find_objects(ref_lab)
    boxes_pred = ndimage.find_objects(pred_lab)
    voxel_mm3 = float(np.prod(spacing))
    pairs = _match(ref_lab, n_ref, pred_lab, n_pred, sizes_ref, sizes_pred)
    sampling = np.asarray(spacing, dtype=np.float64)
    if crop:  # surfaces per lesion, distances between surface points only
        surf_ref = _component_surfaces(ref_lab, boxes_ref)
        surf_pred = _component_surfaces(pred_lab, boxes_pred)

    def distances(i: int | None, j: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Surface distances of reference lesion i and predicted lesion j (None: all)."""
        if not crop:
            a = r if i is None else ref_lab == i
            b = p if j is None else pred_lab == j
            return surface_distances(b, a, spacing)
        a = np.concatenate(surf_ref) if i is None else surf_ref[i - 1]
        b = np.concatenate(surf_pred) if j is None else surf_pred[j - 1]
        return nearest_distances(a, b, sampling), nearest_distances(b, a, sampling)

    # global
    n_p, n_r = int(sizes_pred[1:].sum()), int(sizes_ref[1:].sum())
    overlap = np.count_nonzero(p & r)
    if n_p == 0 and n_r == 0:
        g_dsc = g_nsd = g_hd95 = math.nan
    elif overlap == 0:
        g_dsc, g_nsd, g_hd95 = 0.0, 0.0, math.inf
    else:
        g_dsc = 2.0 * overlap / (n_p + n_r)
        g_nsd, g_hd95 = _reduce(*distances(None, None), tol_global, hd95)

    def centre(lab: np.ndarray, idx: int, sub: tuple[slice, ...]) -> tuple[int, ...]:
        com = ndimage.center_of_mass(lab[sub] == idx)
        start = origin + np.array([s.start for s in sub])
        return tuple(int(round(c + o)) for c, o in zip(com, start, strict=True))

    lesions: list[Lesion] = []
    for i, j, lesion_dice in pairs:
        l_nsd, l_hd95 = _reduce(*distances(i, j), tol_lesion, hd95)
        lesions.append(
            Lesion("matched", i, j, int(sizes_ref[i]), int(sizes_pred[j]),
                   sizes_ref[i] * voxel_mm3, centre(ref_lab, i, boxes_ref[i - 1]),
                   lesion_dice, l_nsd, l_hd95)
        )  # fmt: skip
    matched_ref = {i for i, _, _ in pairs}
    matched_pred = {j for _, j, _ in pairs}
    for i in range(1, n_ref + 1):
        if i not in matched_ref:
            lesions.append(
                Lesion("missed", i, 0, int(sizes_ref[i]), 0, sizes_ref[i] * voxel_mm3,
                       centre(ref_lab, i, boxes_ref[i - 1]), 0.0, 0.0, math.inf)
            )  # fmt: skip
    for j in range(1, n_pred + 1):
        if j not in matched_pred:
            lesions.append(
                Lesion("false", 0, j, 0, int(sizes_pred[j]), sizes_pred[j] * voxel_mm3,
                       centre(pred_lab, j, boxes_pred[j - 1]), 0.0, 0.0, math.inf)
            )  # fmt: skip

    tp = len(pairs)
    matched = [x for x in lesions if x.status == "matched"]
    if tp:
        l_dsc = _mean([x.dsc for x in matched])
        l_nsd = _mean([x.nsd for x in matched])
        l_hd95 = _mean([x.hd95 for x in matched])
    elif n_ref + n_pred == 0:
        l_dsc = l_nsd = l_hd95 = math.nan
    else:
        l_dsc, l_nsd, l_hd95 = 0.0, 0.0, math.inf
    if n_ref == 0:
        pen_dsc = pen_nsd = pen_hd95 = math.nan
    else:
        pen_dsc = _mean([x.dsc for x in lesions])
        pen_nsd = _mean([x.nsd for x in lesions])
        pen_hd95 = _mean([reported(x.hd95) for x in lesions])

    return RegionScore(
        region=region,
        hd95_convention=hd95,
        n_ref=n_ref,
        n_pred=n_pred,
        matched=tp,
        missed=n_ref - tp,
        false=n_pred - tp,
        dsc=float(g_dsc),
        nsd=float(g_nsd),
        hd95=float(g_hd95),
        lesion_dsc=l_dsc,
        lesion_nsd=l_nsd,
        lesion_hd95=l_hd95,
        penalised_dsc=pen_dsc,
        penalised_nsd=pen_nsd,
        penalised_hd95=pen_hd95,
        lesions=tuple(lesions),
    )


def score_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    regions: Mapping[str, Sequence[int]] | str = "canonical",
    *,
    nsd_tolerance: float | None = None,
    hd95: Hd95Convention = "pooled",
    crop: bool = True,
) -> dict[str, RegionScore]:
    """Score every region of one case: ``pred`` and ``ref`` are label volumes in the label
    convention ``regions`` names (a key of :data:`tumorseg.core.labels.REGIONS_BY_CONVENTION`) or a
    ``{region: labels}`` table."""
    table = REGIONS_BY_CONVENTION[regions] if isinstance(regions, str) else regions
    _check(pred, ref, spacing)
    origin = (0, 0, 0)
    if crop:  # one pass over the whole volume; every region lies inside the labelled box
        box = bounding_box((pred != 0) | (ref != 0), MARGIN) or (slice(0, 1),) * 3
        pred, ref, origin = pred[box], ref[box], tuple(s.start for s in box)
    out = {}
    for name, labels in table.items():
        out[name] = score_region(
            _mask(pred, labels),
            _mask(ref, labels),
            spacing,
            region=name,
            nsd_tolerance=nsd_tolerance,
            hd95=hd95,
            crop=crop,
            origin=origin,
        )
    return out


def _mask(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    out = labels == values[0]
    for v in values[1:]:
        out |= labels == v
    return out
