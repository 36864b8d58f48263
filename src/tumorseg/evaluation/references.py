"""Predictions scored against references found on disk: the library behind ``tumorseg-evaluate``.

References are found as ``tumorseg-prepare`` finds them (``reference_files``):

* BraTS 2020/2021 case folders ``<id>/<id>_seg`` (also the case-355 file
  ``W39_1998.09.19_Segm.nii``), labels ``brats2020``;
* BraTS 2023+ case folders ``<id>/<id>-seg``, labels ``brats2023``;
* an MSD ``Task01_BrainTumour`` (``labelsTr/<id>``, or a bare ``labelsTr`` folder), labels
  ``msd``;
* flat files ``<id>_seg`` (``brats2020``), ``<id>-seg`` (``brats2023``) and ``<id>.nii[.gz]``
  (convention not told by the layout), and case folders holding only their segmentation.

Predictions are ``PRED/<case_id>.nii[.gz]``; ``pair_cases`` pairs them with the references by
case id and ``paired_cases`` also checks the shapes from the headers. The label conventions of
a pair (``label_conventions``): the reference's is the one given, else the one its layout
tells, else ``DEFAULT_LABELS``; the prediction's is the one given, else the reference's. Both
volumes are read into the reference's convention (``read_pair``, every value checked) and
scored on the reference's voxel spacing by ``tumorseg.evaluation.cases`` (``score_pair``,
``score_all``). Overlays (``overlay_writers``) show a case's FLAIR, read by the data readers,
for references that belong to a case with its images.

Every problem with the files is a ``DataError`` whose one-line message names the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd

from tumorseg.core.errors import DataError
from tumorseg.core.labels import to_canonical
from tumorseg.data.case import MODALITIES, find_nifti
from tumorseg.data.readers import CaseRef, detect_format, list_cases, nifti_files
from tumorseg.evaluation.cases import case_table, in_convention, lesion_table, scored_rows

if TYPE_CHECKING:
    pass

DEFAULT_LABELS = "brats2020"  # references whose layout does not tell their convention

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- files


@dataclass
class Pair:
    """A prediction and its reference file (``convention``: the reference's, if its layout
    tells it; ``case``: the reference's case as the data readers list it, when it has
    images)."""

    case_id: str
    pred: Path
    ref: Path
    convention: str | None = None
    case: CaseRef | None = None


@dataclass(frozen=True)
class Reference:
    """Where a case's reference is (``path`` None: a case without one), its label convention
    if the layout tells it, and the case's ``CaseRef`` when it has images."""

    path: Path | None = None
    convention: str | None = None
    case: CaseRef | None = None


def from_case(ref: CaseRef) -> Reference:
    """The reference of a case the data readers listed (its segmentation is the last path)."""
    if not ref.labelled:
        return Reference(case=ref)
    return Reference(ref.paths[-1], ref.convention, ref)


def _case_folder(folder: Path) -> Reference:
    """A case folder of a data set that did not list as a whole: read as ``tumorseg-prepare``
    reads a case folder when its images are complete, else only its segmentation."""
    try:
        cases = list_cases(folder, "brats", labelled=False)
    except DataError:
        cases = []
    if len(cases) == 1 and cases[0].case_id == folder.name and cases[0].labelled:
        return from_case(cases[0])
    return Reference(*_seg_only(folder))


def _seg_only(folder: Path) -> tuple[Path | None, str | None]:
    """The segmentation of a case folder holding no images: ``<id>_seg``, ``<id>-seg`` or a
    single file named like one (BraTS 2020 case 355: ``W39_1998.09.19_Segm.nii``)."""
    cid = folder.name
    for stem, convention in ((f"{cid}-seg", "brats2023"), (f"{cid}_seg", "brats2020")):
        path = find_nifti(folder, stem)
        if path is not None:
            return path, convention
    odd = [p for p in nifti_files(folder).values() if "seg" in p.name.lower()]
    if len(odd) > 1:
        raise DataError(f"{folder}: several candidate segmentations {sorted(p.name for p in odd)}")
    return (odd[0], None) if odd else (None, None)


def reference_files(folder: Path) -> dict[str, Reference]:
    """Case id -> its ``Reference``, every layout of the module docstring. A case folder
    without a segmentation maps to an empty ``Reference``, reported only if a prediction
    names it."""
    refs: dict[str, Reference] = {}
    try:
        fmt = detect_format(folder)
    except DataError:
        fmt = None
    if fmt == "kaggle-h5":
        raise DataError(f"{folder}: Kaggle h5 slices cannot be references; give NIfTI files")
    if fmt is not None:  # whole data sets, read as tumorseg-prepare reads them
        try:
            cases = list_cases(folder, fmt, labelled=False)
        except DataError as err:  # e.g. folders holding only the segmentations
            log.debug("not a complete %s data set (%s); looking for segmentations", fmt, err)
            cases = []
        for ref in cases:
            refs[ref.case_id] = from_case(ref)
    if not refs:
        for path in sorted(folder.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                refs[path.name] = _case_folder(path)
        flat = "msd" if folder.name == "labelsTr" else None
        for name, path in nifti_files(folder).items():
            cid, convention = name, flat
            for tail, conv in (("-seg", "brats2023"), ("_seg", "brats2020")):
                if name.endswith(tail) and len(name) > len(tail):
                    cid, convention = name[: -len(tail)], conv
            if refs.get(cid, Reference()).path is None:
                refs[cid] = Reference(path, convention)
    return refs


def pair_cases(pred_dir: Path, ref_dir: Path) -> tuple[list[Pair], dict[str, str]]:
    """Pairs by case id, and problems: case id -> why it has no partner."""
    preds, refs = nifti_files(pred_dir), reference_files(ref_dir)
    pairs, problems = [], {}
    for cid in sorted(set(preds) | {c for c, r in refs.items() if r.path is not None}):
        ref = refs.get(cid, Reference())
        if cid not in preds:
            problems[cid] = f"no prediction {pred_dir / cid}.nii.gz"
        elif ref.path is None:
            problems[cid] = (
                f"no reference {ref_dir / cid}.nii.gz, {ref_dir / cid}-seg.nii.gz or "
                f"{ref_dir / cid / cid}_seg.nii.gz"
            )
        else:
            pairs.append(Pair(cid, preds[cid], ref.path, ref.convention, ref.case))
    return pairs, problems


def load(path: Path) -> nib.Nifti1Image:
    """NIfTI image proxy (header only); a read failure becomes a one-line DataError."""
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for broken files
        raise DataError(f"{path}: cannot read NIfTI ({err})") from None


def voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Voxel array of an image; a read failure (e.g. truncated gzip) becomes a DataError."""
    try:
        return np.asarray(img.dataobj)
    except Exception as err:
        raise DataError(f"{path}: cannot read NIfTI ({err})") from None


def check_shapes(pairs: list[Pair]) -> dict[str, str]:
    """Case id -> shape mismatch, from the headers. Raises DataError for a non-3D volume."""
    problems = {}
    for pair in pairs:
        pred_shape, ref_shape = load(pair.pred).shape, load(pair.ref).shape
        for path, shape in ((pair.pred, pred_shape), (pair.ref, ref_shape)):
            if len(shape) != 3:
                raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
        if pred_shape != ref_shape:
            problems[pair.case_id] = (
                f"prediction shape {pred_shape} ({pair.pred.name}) differs from "
                f"reference {ref_shape} ({pair.ref.name})"
            )
    return problems


def paired_cases(predictions: Path, references: Path) -> tuple[list[Pair], dict[str, str]]:
    """Pairs to score, and the cases that cannot be: case id -> why (no partner, or shapes
    that differ). Raises DataError for a non-3D volume."""
    pairs, problems = pair_cases(predictions, references)
    problems.update(check_shapes(pairs))
    return [p for p in pairs if p.case_id not in problems], problems


def label_conventions(
    pair: Pair, pred_labels: str | None, ref_labels: str | None
) -> tuple[str, str]:
    """(prediction, reference) label conventions: ``ref_labels``, when given, overrides the
    one the reference's layout tells (flat ``<id>.nii.gz``: ``DEFAULT_LABELS``); predictions
    follow their reference unless ``pred_labels`` is given."""
    ref = ref_labels or pair.convention or DEFAULT_LABELS
    return pred_labels or ref, ref


def read_pair(
    pair: Pair, pred_labels: str | None, ref_labels: str | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Prediction and reference voxels, both in the reference's label convention (checked),
    and that convention."""
    pred_labels, ref_labels = label_conventions(pair, pred_labels, ref_labels)
    pred, ref = voxels(load(pair.pred), pair.pred), voxels(load(pair.ref), pair.ref)
    return (
        in_convention(pred, pred_labels, ref_labels, str(pair.pred)),
        in_convention(ref, ref_labels, ref_labels, str(pair.ref)),
        ref_labels,
    )


def score_pair(
    pair: Pair,
    pred_labels: str | None,
    ref_labels: str | None,
    hd95: str = "pooled",
    nsd_tolerance: float | None = None,
) -> tuple[list[dict], list[dict]]:
    """Rows of ``metrics.csv`` and of ``metrics_lesions.csv`` for one case, one per region of
    the reference's label convention."""
    pred_img, ref_img = load(pair.pred), load(pair.ref)
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    pred_spacing = tuple(float(s) for s in pred_img.header.get_zooms()[:3])
    if not np.allclose(pred_spacing, spacing, atol=1e-3):
        log.warning(
            "case %s: prediction spacing %s differs from reference %s; using the reference",
            pair.case_id,
            pred_spacing,
            spacing,
        )
    pred, ref, labels = read_pair(pair, pred_labels, ref_labels)
    return scored_rows(pair.case_id, pred, ref, spacing, hd95, nsd_tolerance, labels)


def score_all(
    pairs: list[Pair],
    pred_labels: str | None,
    ref_labels: str | None,
    progress: bool = True,
    hd95: str = "pooled",
    nsd_tolerance: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-case and per-lesion tables over ``pairs`` with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import track

    rows, lesion_rows = [], []
    console = Console(stderr=True)
    for pair in track(
        pairs, description="Scoring cases", console=console, transient=True, disable=not progress
    ):
        case, lesions = score_pair(pair, pred_labels, ref_labels, hd95, nsd_tolerance)
        rows.extend(case)
        lesion_rows.extend(lesions)
    return case_table(rows, hd95), lesion_table(lesion_rows, hd95)


# ---------------------------------------------------------------- overlays


def flair(case: CaseRef) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR volume and affine of a listed case, read by the data readers (BraTS 2020/2021
    ``_flair``, BraTS 2023+ ``-t2f``, the MSD image's FLAIR channel); its segmentation is not
    read (the scored reference is used)."""
    images = replace(case, paths=case.paths[: len(case.paths) - case.labelled], labelled=False)
    loaded = images.load()
    return loaded.image[MODALITIES.index("flair")], loaded.affine


def save_overlay(pair: Pair, path: Path, pred_labels: str | None, ref_labels: str | None) -> None:
    """Three-view PNG of one case: its FLAIR, the reference solid, the prediction dashed."""
    from tumorseg.inference.overlay import overlay_figure

    image, affine = flair(pair.case)
    pred, ref, labels = read_pair(pair, pred_labels, ref_labels)
    if image.shape != ref.shape:
        raise DataError(
            f"{pair.case.paths[0]}: image shape {image.shape} differs from the reference "
            f"{ref.shape} ({pair.ref.name})"
        )
    pred = to_canonical(pred, labels, str(pair.pred))
    ref = to_canonical(ref, labels, str(pair.ref))
    fig = overlay_figure(image, ref, pred, affine, title=pair.case_id)
    fig.savefig(path, format="png", dpi=80)


def overlay_writers(
    pairs: list[Pair], folder: Path, pred_labels: str | None, ref_labels: str | None
) -> list[tuple[Path, Callable[[Path], None]]]:
    """``(folder/<case_id>.png, writer)`` for each pair whose reference belongs to a case with
    images (see ``flair``); written with the tables, all or nothing."""
    return [
        (
            folder / f"{pair.case_id}.png",
            partial(save_overlay, pair, pred_labels=pred_labels, ref_labels=ref_labels),
        )
        for pair in pairs
        if pair.case is not None
    ]
