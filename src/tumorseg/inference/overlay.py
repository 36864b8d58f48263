"""Tumour overlay figure: axial, coronal and sagittal views with region contours.

``overlay_figure(image, truth, pred, affine, title)`` draws one row of three views of a 3D
volume (FLAIR or T1ce) through the tumour, with the whole tumour (WT, green), tumour core (TC,
red) and enhancing tumour (ET, yellow) outlined: ground truth solid, prediction dashed.

Views are in radiological convention whatever the voxel order on disk: the volume is first
reoriented to RAS with the affine, then the patient's right is on the viewer's left (axial and
coronal), anterior is at the top (axial) or on the left (sagittal) and superior at the top
(coronal and sagittal). Edge letters (R/L, A/P, S/I) come from ``nibabel.aff2axcodes`` of the
reoriented affine. Each view cuts through the slice with the largest tumour area along its axis
(ground truth if given, else prediction; the volume centre when both are empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tumorseg.core.labels import REGIONS

COLOURS = {"wt": "#2ecc40", "tc": "#ff4136", "et": "#ffdc00"}
STYLES = {"truth": "solid", "pred": "dashed"}
OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
# view -> (axis cut through, row axis, column axis) of the RAS volume; column axis < row axis
VIEWS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


@dataclass
class Panel:
    """One 2D view ready to draw: arrays in screen order and the letter at each edge."""

    name: str
    index: int  # slice index along the cut axis (RAS volume)
    image: np.ndarray
    truth: np.ndarray | None
    pred: np.ndarray | None
    aspect: float  # pixel height / width
    left: str
    right: str
    top: str
    bottom: str


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` with axes permuted and flipped to RAS, and the matching affine."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return ras, new_affine


def largest_slices(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Per axis, the slice index with the most ``mask`` voxels (the centre if it is empty)."""
    if mask is None or not mask.any():
        return tuple(s // 2 for s in shape)
    out = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        out.append(int(mask.sum(axis=others).argmax()))
    return tuple(out)


def _plane(volume: np.ndarray | None, axis: int, index: int) -> np.ndarray | None:
    """Slice ``index`` across ``axis`` of a RAS volume as a screen array (rows, columns).

    The two remaining axes keep their order, (column axis, row axis) for every view in
    ``VIEWS``; rows then run from the positive end (A or S) at the top and columns from the
    positive end (R or A) on the left, which is the radiological convention.
    """
    if volume is None:
        return None
    return np.take(volume, index, axis=axis).T[::-1, ::-1]


def panels(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    affine: np.ndarray,
) -> list[Panel]:
    """The three views of a RAS-reoriented copy of the volumes, with their edge letters."""
    ras_image, ras_affine = to_ras(image, affine)
    ras_truth = None if truth is None else to_ras(truth, affine)[0]
    ras_pred = None if pred is None else to_ras(pred, affine)[0]
    codes = nib.aff2axcodes(ras_affine)  # ("R", "A", "S") after reorientation
    zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(0))
    focus = ras_truth if ras_truth is not None and ras_truth.any() else ras_pred
    cut = largest_slices(None if focus is None else focus > 0, ras_image.shape)
    out = []
    for name, (axis, row_axis, col_axis) in VIEWS.items():
        index = cut[axis]
        out.append(
            Panel(
                name=name,
                index=index,
                image=_plane(ras_image, axis, index),
                truth=_plane(ras_truth, axis, index),
                pred=_plane(ras_pred, axis, index),
                aspect=float(zooms[row_axis] / zooms[col_axis]),
                left=codes[col_axis],
                right=OPPOSITE[codes[col_axis]],
                top=codes[row_axis],
                bottom=OPPOSITE[codes[row_axis]],
            )
        )
    return out


def _contours(ax, labels: np.ndarray | None, style: str) -> None:
    """Outline each region of a canonical label plane."""
    if labels is None:
        return
    for region, values in REGIONS.items():
        mask = np.isin(labels, values)
        if mask.any():
            ax.contour(
                mask.astype(np.float32),
                levels=[0.5],
                colors=COLOURS[region],
                linestyles=style,
                linewidths=1.0,
            )


def _letters(ax, panel: Panel) -> None:
    """Orientation letters at the middle of each edge."""
    kw = {"color": "white", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, panel.left, ha="left", va="center", **kw)
    ax.text(0.98, 0.5, panel.right, ha="right", va="center", **kw)
    ax.text(0.5, 0.98, panel.top, ha="center", va="top", **kw)
    ax.text(0.5, 0.02, panel.bottom, ha="center", va="bottom", **kw)


def _legend(fig: Figure, has_truth: bool, has_pred: bool) -> None:
    handles = [Line2D([], [], color=c, label=r.upper()) for r, c in COLOURS.items()]
    if has_truth:
        handles.append(Line2D([], [], color="white", linestyle="solid", label="ground truth"))
    if has_pred:
        handles.append(Line2D([], [], color="white", linestyle="dashed", label="prediction"))
    legend = fig.legend(
        handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8
    )
    for text in legend.get_texts():
        text.set_color("white")


def overlay_figure(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray | None,
    affine: np.ndarray,
    title: str = "",
    modality: str = "FLAIR",
) -> Figure:
    """Axial, coronal and sagittal views of ``image`` with region contours.

    Args:
        image: 3D volume ``(X, Y, Z)`` (e.g. FLAIR or T1ce) in the voxel order of ``affine``.
        truth: canonical label volume (0 bg, 1 NCR, 2 ED, 3 ET) of the same shape, or None;
            drawn solid.
        pred: the prediction, as ``truth``; drawn dashed.
        affine: voxel-to-world affine of the volumes (orientation and voxel size).
        title: figure title (e.g. the case id).
        modality: name of ``image`` shown in the panel titles.

    Returns a matplotlib ``Figure`` (not attached to pyplot); save it with ``fig.savefig``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3D volume, got shape {image.shape}")
    for name, vol in (("truth", truth), ("pred", pred)):
        if vol is not None and vol.shape != image.shape:
            raise ValueError(f"{name} shape {vol.shape} differs from image {image.shape}")
    fig = Figure(figsize=(12, 4.6), facecolor="black", layout="constrained")
    brain = image[image != 0]
    vmin, vmax = np.percentile(brain, (0.5, 99.5)) if brain.size else (0.0, 1.0)
    for ax, panel in zip(fig.subplots(1, 3), panels(image, truth, pred, affine), strict=True):
        ax.imshow(panel.image, cmap="gray", vmin=vmin, vmax=vmax, aspect=panel.aspect)
        _contours(ax, panel.truth, STYLES["truth"])
        _contours(ax, panel.pred, STYLES["pred"])
        _letters(ax, panel)
        ax.set_title(f"{modality} {panel.name} {panel.index}", color="white", fontsize=9)
        ax.axis("off")
    _legend(fig, truth is not None, pred is not None)
    if title:
        fig.suptitle(title, color="white", fontsize=11)
    return fig
