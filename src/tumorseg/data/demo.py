"""Offline BraTS-like demo data set with real brain anatomy and synthetic gliomas.

Writes cases in the BraTS 2020 layout::

    OUTPUT/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii.gz

Each volume is 240x240x155 at 1 mm with the BraTS affine. The anatomy comes from the MNI152
2009a symmetric template and its grey/white-matter maps shipped inside nilearn (no download);
four contrasts are built from tissue fractions. Case ``i`` of seed ``s`` only depends on
``(s, i)`` and the difficulty:

- ``brats`` (default): 1 to 3 gliomas plus small satellites. Edema only a little above grey
  matter on FLAIR and between grey matter and CSF on T2, fading out over 3-9 mm beyond its
  labelled border (infiltration; labels and image disagree a little there, as raters do);
  textured necrosis; a fifth of the cases lower grade (non-enhancing core, at most a small
  enhancing focus). Non-tumour structures enhance on T1ce (vessels, choroid plexus, dura) and
  small white-matter spots are FLAIR-bright. Each case comes from its own "scanner": scale and
  contrast curve per modality, a stronger bias field, 2-6 % Rician noise, sometimes thick
  slices (blur along z).
- ``easy``: 1 to 3 bright uniform lesions with a necrotic core (label 1), an enhancing rim
  (label 4) and edema (label 2), a smooth bias field and Rician noise.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from tumorseg.core.console import progress_bar
from tumorseg.core.errors import DataError
from tumorseg.data.case import BRATS_AFFINE, MODALITIES

log = logging.getLogger(__name__)

SHAPE = (240, 240, 155)
FILES = (*MODALITIES, "seg")
DIFFICULTIES = ("easy", "brats")
MARKER = ".tumorseg-demo.json"  # seed and difficulty of a demo folder

# The MNI152 brain is a little larger than the SRI24 brains of BraTS: shrink it to fit.
SCALE = 0.92
# Largest random shift of the brain in the grid, in voxels per axis.
MAX_SHIFT = (5, 5, 2)

# Mean intensities per modality (columns in MODALITIES order).
# Rows of TISSUE: CSF, grey matter, white matter.
TISSUE = np.array(
    [
        [170.0, 280.0, 300.0, 2400.0],
        [640.0, 600.0, 640.0, 1250.0],
        [540.0, 880.0, 860.0, 820.0],
    ],
    dtype=np.float32,
)
# Rows of TUMOUR: edema (2), enhancing tumour (4), necrosis (1).
TUMOUR = np.array(
    [
        [1150.0, 650.0, 660.0, 1900.0],
        [1000.0, 640.0, 1650.0, 1500.0],
        [560.0, 300.0, 320.0, 2250.0],
    ],
    dtype=np.float32,
)
# Share of the underlying anatomy that still shows through each tumour class.
KEEP = (0.3, 0.1, 0.0)
# Smallest tumour fragment kept, in voxels.
MIN_PART = 64


@dataclass(frozen=True)
class Anatomy:
    """Template brain placed in the BraTS grid, reduced to its bounding box."""

    origin: np.ndarray  # (3,) box corner in the unshifted grid
    pos: np.ndarray  # box-shaped int32: column in `fractions` of a brain voxel, -1 outside
    flat: np.ndarray  # (N,) flat grid index of each brain voxel, unshifted
    fractions: np.ndarray  # (3, N) CSF, GM, WM fractions
    terms: np.ndarray  # (9, N) polynomial terms of the bias field
    centres: np.ndarray  # (K, 3) box coordinates where a lesion may be centred
    shift: np.ndarray  # (3,) largest allowed shift per axis
    depth: np.ndarray  # (N,) distance of each brain voxel from the brain surface, in mm
    ventricles: np.ndarray  # (M, 3) box coordinates of deep CSF (choroid plexus sites)


class DemoError(DataError):
    """A demo folder or option that does not fit the request."""


def case_id(index: int) -> str:
    """BraTS 2020 training case name, e.g. ``BraTS20_Training_001``."""
    return f"BraTS20_Training_{index:03d}"


def _to_grid(data: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Resample a 1 mm RAS template so that `centre` lands mid-grid, in BraTS (LPS) order."""
    flip = np.array([-1.0, -1.0, 1.0])  # BraTS axes 0 and 1 run opposite to RAS
    matrix = flip / SCALE
    grid_centre = (np.array(SHAPE) - 1) / 2
    offset = centre - matrix * grid_centre
    return ndi.affine_transform(data, matrix, offset=offset, output_shape=SHAPE, order=1)


@functools.cache
def _anatomy() -> Anatomy:
    """Load and resample the nilearn MNI152 maps once per process."""
    from nilearn import datasets  # slow import: only when data is generated

    start = time.perf_counter()
    t1 = datasets.load_mni152_template(resolution=1).get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)

    brain = np.argwhere(t1 > 0.2)
    centre = (brain.min(0) + brain.max(0)) / 2
    mask = _to_grid(t1, centre) > 0.2
    gm = np.clip(_to_grid(gm, centre), 0, 1)
    wm = np.clip(_to_grid(wm, centre), 0, 1)
    csf = np.clip(1 - gm - wm, 0, 1)

    # Crop everything to the bounding box of the brain.
    where = np.argwhere(mask)
    lo, hi = where.min(0), where.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    mask = mask[box]
    pos = np.full(mask.shape, -1, dtype=np.int32)
    pos[mask] = np.arange(int(mask.sum()), dtype=np.int32)
    fractions = np.stack([csf[box][mask], gm[box][mask], wm[box][mask]])
    flat = np.ravel_multi_index(tuple((np.argwhere(mask) + lo).T), SHAPE)

    # Bias-field terms: x, y, z and their products, coordinates scaled to [-1, 1].
    xyz = np.argwhere(mask).astype(np.float32)
    xyz = 2 * xyz / (np.array(mask.shape, dtype=np.float32) - 1) - 1
    x, y, z = xyz.T
    terms = np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])

    # Lesion centres: white matter at least 12 mm from the brain surface.
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    centres = np.argwhere((wm[box] > 0.6) & (depth > 12)).astype(np.int32)

    ventricles = np.argwhere((csf[box] > 0.85) & (depth > 25)).astype(np.int32)

    shift = np.minimum(np.minimum(lo, np.array(SHAPE) - hi), MAX_SHIFT)
    log.debug("MNI152 anatomy ready in %.2f s: box %s", time.perf_counter() - start, mask.shape)
    return Anatomy(
        lo,
        pos,
        flat,
        fractions,
        terms.astype(np.float32),
        centres,
        shift,
        depth[mask].astype(np.float32),
        ventricles,
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
    """Zero-mean unit-variance noise varying over about `cell` voxels (upsampled grid)."""
    coarse = tuple(int(np.ceil(n / cell)) + 3 for n in shape)
    mid = tuple(max(n // 3, c) for n, c in zip(shape, coarse, strict=True))
    low = rng.standard_normal(coarse, dtype=np.float32)
    low = ndi.zoom(low, [m / c for m, c in zip(mid, coarse, strict=True)], order=3, mode="nearest")
    out = ndi.zoom(low, [n / m for n, m in zip(shape, mid, strict=True)], order=1, mode="nearest")
    out = out[tuple(slice(0, n) for n in shape)]
    return (out - out.mean()) / (out.std() + 1e-6)


def _ramp(level: float | np.ndarray, r: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``r < level`` with a linear edge `width` wide; 0.5 on the boundary."""
    return np.clip((level - r) / width + 0.5, 0, 1)


def _lesion(
    rng: np.random.Generator, anatomy: Anatomy, centre: np.ndarray, radius: float
) -> tuple[np.ndarray, ...]:
    """One lesion: its bounding box (lo, hi) and soft edema/core/necrosis weights there."""
    radii = radius * rng.uniform(0.8, 1.2, 3)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    half = int(np.ceil(radii.max() * 1.7)) + 2  # room for the outline factors below
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, anatomy.pos.shape)
    shape = tuple(int(n) for n in hi - lo)

    def field(offset: np.ndarray) -> np.ndarray:
        # Ellipsoidal radius (1 on the surface) around centre + offset.
        d = [
            (np.arange(a, b, dtype=np.float32) - c - o).reshape(
                [-1 if k == i else 1 for k in range(3)]
            )
            for i, (a, b, c, o) in enumerate(zip(lo, hi, centre, offset, strict=True))
        ]
        r2 = 0
        for k in range(3):
            q = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
            r2 = r2 + (q / radii[k]) ** 2
        return np.sqrt(r2)

    # Irregular outlines: divide the radius by a smooth random factor. Edema spreads
    # further along white matter than into grey matter and CSF.
    pos = anatomy.pos[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    wm = np.where(pos >= 0, anatomy.fractions[2, pos], 0)
    bumps = np.clip(_smooth_noise(rng, shape, cell=radius / 1.5), -2, 2)
    edema = field(np.zeros(3)) * np.exp(-0.18 * bumps) * (1.1 - 0.25 * wm)
    bumps = np.clip(_smooth_noise(rng, shape, cell=radius / 2.5), -2, 2)
    core = field(rng.normal(0, 0.1 * radius, 3)) * np.exp(-0.15 * bumps)

    core_level = rng.uniform(0.55, 0.85)
    necrosis_level = core_level * rng.uniform(0.6, 0.85)
    if rng.random() < 0.3 and core_level * radius < 14:  # small cores may be solid
        necrosis_level = 0.0
    width = 1.5 / radius
    we = _ramp(1.0, edema, width)
    wc = _ramp(core_level, core, width)
    wn = _ramp(necrosis_level, core, width) if necrosis_level else np.zeros_like(wc)

    # Keep only what is connected to the centre: no scattered specks.
    parts, _ = ndi.label(np.maximum(we, wc) > 0)
    keep = parts == parts[tuple(centre - lo)]
    return lo, hi, we * keep, wc * keep, wn * keep


def _tumours(
    rng: np.random.Generator, anatomy: Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesions of one case: box corner, labels and soft class weights over their union."""
    count = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    lesions = []
    for k in range(count):
        centre = anatomy.centres[rng.integers(len(anatomy.centres))]
        radius = rng.uniform(13, 32) if k == 0 else rng.uniform(7, 16)
        lesions.append(_lesion(rng, anatomy, centre, radius))

    lo = np.min([les[0] for les in lesions], axis=0)
    hi = np.max([les[1] for les in lesions], axis=0)
    weights = np.zeros((3, *(hi - lo)), dtype=np.float32)
    for a, b, *parts in lesions:
        sub = tuple(slice(int(i), int(j)) for i, j in zip(a - lo, b - lo, strict=True))
        for w, part in zip(weights, parts, strict=True):
            np.maximum(w[sub], part, out=w[sub])

    # Clip to the brain and nest the classes: necrosis within core within edema.
    union = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    weights *= anatomy.pos[union] >= 0
    np.maximum(weights[1], weights[2], out=weights[1])
    np.maximum(weights[0], weights[1], out=weights[0])

    # Drop specks (under about 5 mm across) left by clipping to the brain.
    parts, count = ndi.label(weights[0] >= 0.5)
    small = np.flatnonzero(np.bincount(parts.ravel(), minlength=count + 1) < MIN_PART)
    weights[:, np.isin(parts, small[small > 0])] = 0

    we, wc, wn = weights >= 0.5
    labels = np.where(wn, 1, np.where(wc, 4, np.where(we, 2, 0))).astype(np.uint8)
    return lo, labels, weights


# ---------------------------------------------------------------- the realistic profile

# Per class (rows) and modality (columns, MODALITIES order): low and high end of a uniform
# draw per case. Rows: edema, enhancing tumour, necrosis, non-enhancing tumour core.
# Edema sits between grey matter and CSF on T2 and only a little above grey matter on FLAIR.
# The non-enhancing core of lower-grade gliomas shows the T2-FLAIR mismatch: as bright as CSF
# on T2 but only grey-matter bright on FLAIR (darker than the edema around it), dark on T1.
BRATS_TUMOUR = np.array(
    [
        [[720.0, 470.0, 490.0, 1350.0], [1000.0, 640.0, 680.0, 2200.0]],
        [[780.0, 520.0, 1150.0, 1150.0], [1100.0, 700.0, 1750.0, 1750.0]],
        [[300.0, 220.0, 240.0, 1700.0], [850.0, 420.0, 440.0, 2600.0]],
        [[480.0, 300.0, 320.0, 2200.0], [680.0, 400.0, 420.0, 2900.0]],
    ],
    dtype=np.float32,
)
# Share of the anatomy that still shows through edema, the core class and the inner class.
BRATS_KEEP = (0.45, 0.12, 0.05)
# Non-tumour structures (rows): vessels and choroid plexus, dura, white-matter
# hyperintensities; low and high ends as above. Vessels, plexus and dura enhance on T1ce.
MIMICS = np.array(
    [
        [[400.0, 560.0, 1300.0, 450.0], [650.0, 760.0, 2000.0, 900.0]],
        [[300.0, 300.0, 1000.0, 900.0], [500.0, 450.0, 1500.0, 1500.0]],
        [[850.0, 430.0, 450.0, 1450.0], [1150.0, 560.0, 580.0, 2000.0]],
    ],
    dtype=np.float32,
)
# Share of lower-grade cases: non-enhancing core, at most a small enhancing focus.
LOW_GRADE = 0.2


def _ellipsoid(
    lo: np.ndarray, hi: np.ndarray, centre: np.ndarray, rot: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Ellipsoidal radius (1 on the surface) over the box ``lo:hi``."""
    d = [
        (np.arange(a, b, dtype=np.float32) - c).reshape([-1 if k == i else 1 for k in range(3)])
        for i, (a, b, c) in enumerate(zip(lo, hi, centre, strict=True))
    ]
    r2 = 0
    for k in range(3):
        q = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
        r2 = r2 + (q / radii[k]) ** 2
    return np.sqrt(r2)


def _lesion_brats(
    rng: np.random.Generator,
    anatomy: Anatomy,
    centre: np.ndarray,
    radius: float,
    low_grade: bool,
    border: float,
) -> tuple[np.ndarray, ...]:
    """One glioma: box (lo, hi), label masks and soft image weights of edema/core/inner.

    High grade: core = enhancing tumour, inner = necrosis. Lower grade: core = non-enhancing
    tumour, inner = a small enhancing focus or nothing. Labels follow the shapes sharply;
    the image sees them through wide ramps (``border`` mm for edema: infiltration) and a
    smooth perturbation, so that the labelled border is not an intensity step.
    """
    radii = radius * rng.uniform(0.75, 1.25, 3)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    half = int(np.ceil(radii.max() * 1.8 + border)) + 2
    centre = np.asarray(centre)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, anatomy.pos.shape)
    shape = tuple(int(n) for n in hi - lo)

    pos = anatomy.pos[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    wm = np.where(pos >= 0, anatomy.fractions[2, pos], 0)
    bumps = np.clip(_smooth_noise(rng, shape, cell=max(radius / 1.5, 3.0)), -2.5, 2.5)
    # Edema reaches further along white matter (fingers) than into grey matter and CSF.
    edema = _ellipsoid(lo, hi, centre, rot, radii) * np.exp(-0.25 * bumps) * (1.2 - 0.4 * wm)
    offset = centre + rng.normal(0, 0.12 * radius, 3)
    bumps = np.clip(_smooth_noise(rng, shape, cell=max(radius / 2.5, 2.5)), -2.5, 2.5)
    core = _ellipsoid(lo, hi, offset, rot, radii) * np.exp(-0.2 * bumps)

    if low_grade:
        core_level = rng.uniform(0.4, 0.75)
        inner, inner_level = core, 0.0
        if rng.random() < 0.5:  # a small enhancing focus somewhere in the core
            spot = offset + rng.normal(0, 0.2 * core_level * radius, 3)
            small = radii * core_level * rng.uniform(0.3, 0.5)
            inner = _ellipsoid(lo, hi, spot, rot, np.maximum(small, 1.5)) * np.exp(-0.2 * bumps)
            inner_level = 1.0
    else:
        core_level = rng.uniform(0.45, 0.8)
        inner, inner_level = core, core_level * rng.uniform(0.3, 0.65)
        if rng.random() < 0.25 and core_level * radius < 12:  # small cores may be solid
            inner_level = 0.0

    labels = np.stack([edema < 1.0, core < core_level, inner < inner_level])
    # Keep only the part connected to the centre: no scattered specks.
    parts, _ = ndi.label(labels[0] | labels[1])
    keep = parts == parts[tuple(centre - lo)]
    labels &= keep

    seen = np.exp(0.08 * bumps[::-1, ::-1, ::-1])  # another smooth pattern, for free
    images = np.stack(
        [
            _ramp(1.0, edema * seen, border / radius),
            _ramp(core_level, core * seen, rng.uniform(1.0, 3.0) / radius),
            _ramp(inner_level, inner * seen, rng.uniform(1.0, 3.0) / radius)
            if inner_level
            else np.zeros(shape, dtype=np.float32),
        ]
    ).astype(np.float32)
    return lo, hi, labels, images


def _tumours_brats(
    rng: np.random.Generator, anatomy: Anatomy, low_grade: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gliomas and satellites of one case: box corner, BraTS labels, image weights."""
    count = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    border = rng.uniform(3.0, 9.0)  # how far edema fades out beyond its labelled border
    lesions = []
    main = anatomy.centres[rng.integers(len(anatomy.centres))]
    for k in range(count):
        centre = main if k == 0 else anatomy.centres[rng.integers(len(anatomy.centres))]
        radius = rng.uniform(13, 30) if k == 0 else rng.uniform(7, 15)
        if k == 0:
            main_radius = radius
        lesions.append(_lesion_brats(rng, anatomy, centre, radius, low_grade, border))
    # Small satellite lesions near the main one.
    satellites = int(rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1]))
    if satellites:
        dist = np.sqrt(((anatomy.centres - main) ** 2).sum(1))
        near = np.flatnonzero((dist > main_radius + 6) & (dist < main_radius + 28))
        for _ in range(satellites if len(near) else 0):
            centre = anatomy.centres[near[rng.integers(len(near))]]
            radius = rng.uniform(3.5, 7.0)
            lesions.append(_lesion_brats(rng, anatomy, centre, radius, low_grade, border / 2))

    lo = np.min([les[0] for les in lesions], axis=0)
    hi = np.max([les[1] for les in lesions], axis=0)
    masks = np.zeros((3, *(hi - lo)), dtype=bool)
    weights = np.zeros((3, *(hi - lo)), dtype=np.float32)
    for a, b, labels, images in lesions:
        sub = (slice(None), *(slice(int(i), int(j)) for i, j in zip(a - lo, b - lo, strict=True)))
        masks[sub] |= labels
        np.maximum(weights[sub], images, out=weights[sub])

    # Clip to the brain and nest the classes: inner within core within edema.
    union = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    brain = anatomy.pos[union] >= 0
    masks &= brain
    weights *= brain
    masks[1] |= masks[2]
    masks[0] |= masks[1]
    np.maximum(weights[1], weights[2], out=weights[1])
    np.maximum(weights[0], weights[1], out=weights[0])

    # Drop specks (under about 5 mm across) left by clipping to the brain.
    parts, n = ndi.label(masks[0])
    small = np.flatnonzero(np.bincount(parts.ravel(), minlength=n + 1) < MIN_PART)
    masks[:, np.isin(parts, small[small > 0])] = False

    edema_only, core, inner = masks
    if low_grade:  # core: non-enhancing tumour (1), inner: enhancing focus (4)
        labels = np.where(inner, 4, np.where(core, 1, np.where(edema_only, 2, 0)))
    else:  # core: enhancing rim (4), inner: necrosis (1)
        labels = np.where(inner, 1, np.where(core, 4, np.where(edema_only, 2, 0)))
    return lo, labels.astype(np.uint8), weights


def _blobs(
    rng: np.random.Generator, anatomy: Anatomy, centres: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """(N,) soft weights of small spheres at box coordinates `centres`, over brain voxels."""
    out = np.zeros(anatomy.fractions.shape[1], dtype=np.float32)
    for centre, radius in zip(centres, radii, strict=True):
        half = int(np.ceil(radius)) + 2
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, anatomy.pos.shape)
        axes = [np.arange(a, b) - c for a, b, c in zip(lo, hi, centre, strict=True)]
        r = np.sqrt(
            sum(x.reshape([-1 if k == i else 1 for k in range(3)]) ** 2 for i, x in enumerate(axes))
        )
        w = _ramp(radius, r * rng.uniform(0.8, 1.2), 1.5)
        pos = anatomy.pos[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        inside = (pos >= 0) & (w > 0)
        np.maximum.at(out, pos[inside], w[inside])
    return out


def _vessels(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """(N,) weights of thin winding vessels (about 2-3 mm across), over brain voxels."""
    shape = np.array(anatomy.pos.shape)
    points = []
    for _ in range(int(rng.integers(12, 25))):
        start = rng.uniform(0.15, 0.85, 3) * shape
        steps = int(rng.integers(25, 80))
        turn = np.cumsum(rng.normal(0, 0.25, (steps, 3)), axis=0) + rng.normal(0, 1, 3)
        turn /= np.linalg.norm(turn, axis=1, keepdims=True) + 1e-6
        points.append(start + np.cumsum(turn, axis=0))
    pts = np.rint(np.concatenate(points)).astype(np.int64)
    out = np.zeros(anatomy.fractions.shape[1], dtype=np.float32)
    grid = np.mgrid[-1:2, -1:2, -1:2].reshape(3, -1).T
    for off in grid:
        weight = float(np.exp(-(off**2).sum() / 1.6))
        p = pts + off
        ok = np.all((p >= 0) & (p < shape), axis=1)
        cols = anatomy.pos[tuple(p[ok].T)]
        cols = cols[cols >= 0]
        np.maximum.at(out, cols, weight)
    return out


def _mimics(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """(3, N) weights of non-tumour look-alikes: enhancing vessels and choroid plexus,
    enhancing dura at the brain surface, FLAIR-bright white-matter spots."""
    vessels = _vessels(rng, anatomy)
    plexus = anatomy.ventricles[rng.integers(len(anatomy.ventricles), size=rng.integers(2, 5))]
    np.maximum(
        vessels, _blobs(rng, anatomy, plexus, rng.uniform(2.0, 4.0, len(plexus))), out=vessels
    )
    # Dura: the outer 2 mm, enhancing in smooth patches.
    patch = np.clip(
        rng.normal(0, 1, 9).astype(np.float32) @ anatomy.terms + rng.uniform(-0.5, 1), 0, 1
    )
    dura = np.clip(2.0 - anatomy.depth, 0, 1) * patch
    spots = anatomy.centres[rng.integers(len(anatomy.centres), size=rng.integers(0, 6))]
    wmh = _blobs(rng, anatomy, spots, rng.uniform(1.5, 3.5, len(spots)))
    return np.stack([vessels, dura, wmh])


def _make_case_brats(
    rng: np.random.Generator, anatomy: Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Realistic case: (4, N) brain intensities, tumour box corner and labels."""
    low_grade = bool(rng.random() < LOW_GRADE)
    # Scanner: per-modality scale, contrast curve, tissue contrast, bias, noise, slice blur.
    gain = rng.lognormal(0.0, 0.3, 4).astype(np.float32) * rng.uniform(0.5, 2.0)
    gamma = rng.uniform(0.75, 1.3, 4).astype(np.float32)
    tissue = TISSUE * rng.uniform(0.9, 1.1, TISSUE.shape).astype(np.float32)
    ref = tissue[2].copy()  # white matter

    def curve(x: np.ndarray) -> np.ndarray:  # the scanner's contrast curve per modality
        return ref * (x / ref) ** gamma

    tissue = curve(tissue)
    values = tissue.T @ anatomy.fractions  # (4, N)

    for w, (a, b) in zip(_mimics(rng, anatomy), MIMICS, strict=True):
        target = curve(rng.uniform(a, b).astype(np.float32))
        cols = np.flatnonzero(w > 0)
        values[:, cols] += 0.9 * w[cols] * (target[:, None] - values[:, cols])

    lo, labels, weights = _tumours_brats(rng, anatomy, low_grade)
    inside = weights[0] > 0
    union = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, labels.shape, strict=True))
    cols = anatomy.pos[union][inside]
    rows = (0, 3, 1) if low_grade else (0, 1, 2)  # edema, core class, inner class
    targets = [curve(rng.uniform(*BRATS_TUMOUR[r]).astype(np.float32))[:, None] for r in rows]
    noise = _smooth_noise(rng, labels.shape, cell=3.5)
    texture = [1 + amp * noise[inside] for amp in (0.1, 0.18)]
    texture.append(1 + 0.3 * noise[::-1, ::-1, ::-1][inside])  # necrosis: its own pattern
    part = values[:, cols]
    for w, target, tex, keep in zip(weights[:, inside], targets, texture, BRATS_KEEP, strict=True):
        part += (1 - keep) * w * (target * tex - part)
    values[:, cols] = part

    # Bias field, thick slices, scale and noise.
    scale = np.array([0.2] * 3 + [0.12] * 6, dtype=np.float32)[:, None]
    coef = rng.normal(0, 1, (9, 4)).astype(np.float32) * scale
    values *= np.exp(coef.T @ anatomy.terms)
    if rng.random() < 0.4:  # thick slices: blur along z
        sigma = rng.uniform(0.6, 1.3)
        mask = anatomy.pos >= 0
        box = np.zeros(mask.shape, dtype=np.float32)
        for k in range(4):
            box[mask] = values[k]
            values[k] = ndi.gaussian_filter1d(box, sigma, axis=2)[mask]
    values *= gain[:, None]
    sigma = (tissue[2] * gain * rng.uniform(0.02, 0.06, 4))[:, None]
    real = values + rng.standard_normal(values.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(values.shape, dtype=np.float32) * sigma
    values = np.sqrt(real * real + imag * imag)
    return values, lo, labels


def _make_case_easy(
    rng: np.random.Generator, anatomy: Anatomy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Easy case: (4, N) brain intensities, tumour box corner and labels."""
    # Per-case contrast: global gain per modality and a small jitter per tissue.
    gain = rng.uniform(0.85, 1.15, 4).astype(np.float32)
    tissue = TISSUE * rng.uniform(0.95, 1.05, TISSUE.shape).astype(np.float32) * gain
    tumour = TUMOUR * rng.uniform(0.92, 1.08, TUMOUR.shape).astype(np.float32) * gain
    # Arrays are (feature, voxel): small @ large is fast, large @ small is not.
    values = tissue.T @ anatomy.fractions  # (4, N)

    # Blend lesion intensities in, class by class, with some texture.
    lo, labels, weights = _tumours(rng, anatomy)
    inside = weights[0] > 0
    union = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, labels.shape, strict=True))
    cols = anatomy.pos[union][inside]
    texture = 1 + 0.1 * _smooth_noise(rng, labels.shape, cell=5.0)[inside]
    part = values[:, cols]
    for w, target, keep in zip(weights[:, inside], tumour, KEEP, strict=True):
        part += (1 - keep) * w * (target[:, None] * texture - part)
    values[:, cols] = part

    # Smooth multiplicative bias field, different per modality.
    scale = np.array([0.12] * 3 + [0.08] * 6, dtype=np.float32)[:, None]
    coef = rng.normal(0, 1, (9, 4)).astype(np.float32) * scale
    values *= np.exp(coef.T @ anatomy.terms)

    # Rician noise: magnitude of a complex signal with Gaussian noise on both channels.
    sigma = (tissue[2] * rng.uniform(0.02, 0.04, 4))[:, None]  # 2-4 % of white matter
    real = values + rng.standard_normal(values.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(values.shape, dtype=np.float32) * sigma
    values = np.sqrt(real * real + imag * imag)
    return values, lo, labels


def make_case(
    index: int, seed: int, difficulty: str = "brats"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Synthesise case `index`: int16 images keyed by modality and the uint8 BraTS seg.

    ``difficulty`` is ``brats`` (realistic gliomas, look-alikes and scanner differences) or
    ``easy`` (bright uniform lesions with clean borders).
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    rng = np.random.default_rng([seed, index])
    anatomy = _anatomy()
    make = _make_case_easy if difficulty == "easy" else _make_case_brats
    values, lo, labels = make(rng, anatomy)
    values = np.rint(np.clip(values, 1, 32767)).astype(np.int16)

    # Place the brain in the grid with a small random shift.
    shift = np.array([rng.integers(-s, s + 1) for s in anatomy.shift])
    flat = anatomy.flat + int(shift @ np.array([SHAPE[1] * SHAPE[2], SHAPE[2], 1]))
    images = {}
    for k, name in enumerate(MODALITIES):
        image = np.zeros(SHAPE, dtype=np.int16)
        image.ravel()[flat] = values[k]
        images[name] = image
    seg = np.zeros(SHAPE, dtype=np.uint8)
    start = anatomy.origin + lo + shift
    seg[tuple(slice(int(a), int(a) + n) for a, n in zip(start, labels.shape, strict=True))] = labels
    return images, seg


def case_complete(folder: Path) -> bool:
    return all((folder / f"{folder.name}_{name}.nii.gz").is_file() for name in FILES)


def _write_case(output: Path, index: int, seed: int, difficulty: str = "brats") -> Path:
    """Write one case into a hidden temporary folder, then rename it into place."""
    name = case_id(index)
    final = output / name
    tmp = output / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    images, seg = make_case(index, seed, difficulty)
    arrays = {**images, "seg": seg}
    for key in FILES:
        img = nib.Nifti1Image(arrays[key], BRATS_AFFINE)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, tmp / f"{name}_{key}.nii.gz")
    if final.exists():  # an incomplete folder from elsewhere: replace it
        log.warning("replacing incomplete case folder %s", final)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _check_marker(output: Path, seed: int, difficulty: str) -> None:
    """Refuse to add cases to a folder written with another seed or difficulty."""
    marker = output / MARKER
    want = {"seed": seed, "difficulty": difficulty}
    if marker.is_file():
        have = json.loads(marker.read_text())
        have = {key: have.get(key) for key in want}
        if have != want:
            raise DemoError(
                f"{output}: holds demo cases with seed {have['seed']}, difficulty "
                f"{have['difficulty']}; asked for seed {seed}, difficulty {difficulty} "
                "(use another folder)"
            )
    elif any(case_complete(f) for f in output.glob("BraTS20_Training_*")):
        raise DemoError(
            f"{output}: holds demo cases of an earlier generator (no {MARKER}); "
            "delete them or use another folder"
        )
    else:
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({**want, "generator": "tumorseg-demo"}, indent=2) + "\n")
        os.replace(tmp, marker)


def write_demo(
    output: str | Path,
    cases: int,
    seed: int = 0,
    progress: bool = True,
    difficulty: str = "brats",
    workers: int = 1,
) -> list[Path]:
    """Write demo cases 1..`cases` into `output`, keeping complete existing case folders;
    ``workers`` processes write cases side by side (each case has its own seed, so the files
    are the same whatever the number of workers).

    The folder records its seed and difficulty in a hidden ``.tumorseg-demo.json``; asking
    for other ones there raises ``DemoError`` rather than mixing two data sets.
    """
    if difficulty not in DIFFICULTIES:
        raise DemoError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _check_marker(output, seed, difficulty)
    missing = [i for i in range(1, cases + 1) if not case_complete(output / case_id(i))]
    quiet = not progress or not missing  # no bar when there is no work
    with progress_bar(quiet=quiet, transient=False) as bar:
        task = bar.add_task(f"Synthesising BraTS demo cases ({difficulty})", total=cases)
        bar.advance(task, cases - len(missing))
        for folder, seconds in _write_cases(output, missing, seed, difficulty, workers):
            log.info("wrote %s in %.2f s", folder, seconds)
            bar.advance(task)
    return [output / case_id(i) for i in range(1, cases + 1)]


def _timed_case(output: Path, index: int, seed: int, difficulty: str) -> tuple[Path, float]:
    start = time.perf_counter()
    return _write_case(output, index, seed, difficulty), time.perf_counter() - start


def _write_cases(
    output: Path, indices: list[int], seed: int, difficulty: str, workers: int
) -> Iterator[tuple[Path, float]]:
    """Write the cases ``indices`` (in this process for one worker, else in a process pool),
    yielding each folder and its seconds as it is done."""
    if workers <= 1 or len(indices) <= 1:
        for index in indices:
            yield _timed_case(output, index, seed, difficulty)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tumorseg.core.processes import exit_with_parent
    from tumorseg.data.prepare import start_method

    ctx = multiprocessing.get_context(start_method())
    n = min(workers, len(indices))
    with ProcessPoolExecutor(
        n, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(_timed_case, output, i, seed, difficulty) for i in indices]
        for done in as_completed(futures):
            yield done.result()
