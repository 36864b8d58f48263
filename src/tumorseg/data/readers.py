"""Readers for the BraTS data sources, each giving the canonical ``Case``.

Formats (``FORMATS``):

- ``kaggle-h5``: the Kaggle "BraTS2020 training data" set of 2D slices,
  ``BraTS2020_training_data/content/data/volume_{V}_slice_{S}.h5`` with ``image`` (240, 240, 4)
  float64 and a one-hot ``mask`` (240, 240, 3). A volume (patient) is its slices ordered by S.
- ``brats``: case folders of NIfTI files, BraTS 2020/2021 naming ``ID/ID_{flair,t1,t1ce,t2,seg}``
  (labels 1/2/4) or BraTS 2023+ naming ``ID/ID-{t2f,t1n,t1c,t2w,seg}`` (labels 1/2/3).
- ``msd``: Medical Segmentation Decathlon Task01_BrainTumour, 4D images in ``imagesTr/`` and
  ``imagesTs/``, labels (1 edema, 2 non-enhancing, 3 enhancing) in ``labelsTr/``.

``list_cases`` lists a data set as ``CaseRef`` items without reading voxels; ``CaseRef.load``
reads one case. ``read_any`` reads a single case (a case folder or an MSD image) for prediction.
Every problem with the input is a ``DataError`` whose one-line message names the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from tumorseg.core.errors import DataError
from tumorseg.core.labels import CONVENTIONS, MASK_ORDER, check_mask_order, from_one_hot
from tumorseg.data.case import (
    BRATS_AFFINE,
    MODALITIES,
    SUFFIXES,
    Case,
    find_nifti,
    read_images,
    read_nifti,
    read_seg,
)

log = logging.getLogger(__name__)

FORMATS = ("kaggle-h5", "brats", "msd")


# Kaggle: where the slices may sit relative to the folder the user points at.
KAGGLE_DIRS = (".", "data", "content/data", "BraTS2020_training_data/content/data")
KAGGLE_NAME = re.compile(r"volume_(\d+)_slice_(\d+)\.h5")
KAGGLE_BLOCK = 16  # slices gathered before being moved into the (C, H, W, Z) volume

# BraTS 2023+ file suffix of each modality.
BRATS2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}

# MSD dataset.json modality names -> ours; the documented Task01 order is the default.
MSD_NAMES = {
    "flair": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}
MSD_ORDER = ("flair", "t1", "t1ce", "t2")  # FLAIR, T1w, T1gd, T2w

LOOKED_FOR = (
    "Kaggle volume_<V>_slice_<S>.h5 in ., content/data or BraTS2020_training_data/content/data; "
    "MSD imagesTr/ or imagesTs/; case folders ID/ID_flair.nii[.gz] or ID/ID-t2f.nii[.gz] "
    "here or one folder down"
)


@dataclass(frozen=True)
class CaseRef:
    """One case of a data set: where it is read from and how.

    ``paths`` are the files read (Kaggle: the slices in order; NIfTI: the modality files,
    then the segmentation when ``labelled``). ``convention`` is the label convention of a
    NIfTI segmentation; ``channel_order`` names the modality of each stored channel of a
    Kaggle slice or MSD image.
    """

    case_id: str
    format: str
    paths: tuple[Path, ...]
    labelled: bool = True
    convention: str = "brats2020"
    channel_order: tuple[str, ...] = MODALITIES
    mask_order: tuple[str, ...] = MASK_ORDER  # Kaggle one-hot mask channels

    def load(self) -> Case:
        """Read the case into a canonical ``Case``; bad input raises ``DataError``."""
        if self.format == "kaggle-h5":
            return _load_kaggle(self)
        if self.format == "brats":
            return _load_brats(self)
        if self.format == "msd":
            return _load_msd(self)
        raise DataError(f"{self.case_id}: unknown format {self.format!r} (expected {FORMATS})")


# ---------------------------------------------------------------------------- public API


def detect_format(root: str | Path) -> str:
    """The format (one of ``FORMATS``) of the data set in directory ``root``."""
    root = _existing_dir(root)
    with os.scandir(root) as entries:
        if not any(not e.name.startswith(".") for e in entries):
            raise DataError(f"{root}: empty directory")
    if _kaggle_dir(root):
        return "kaggle-h5"
    if _msd_dir(root):
        return "msd"
    if _brats_case_dirs(root):
        return "brats"
    raise DataError(f"{root}: not a recognised BraTS layout (looked for {LOOKED_FOR})")


def list_cases(
    root: str | Path,
    fmt: str = "auto",
    labelled: bool = True,
    channel_order: tuple[str, ...] = MODALITIES,
    *,
    skip_bad: bool = False,
    convention: str | None = None,
    mask_order: tuple[str, ...] = MASK_ORDER,
) -> list[CaseRef]:
    """The cases under ``root``, sorted by ``case_id``; no voxel is read.

    Args:
        fmt: one of ``FORMATS``, or ``auto`` to use ``detect_format``.
        labelled: only cases with a segmentation (unlabelled ones are skipped with a logged
            note); False lists every case, labelled or not.
        channel_order: modality of each stored Kaggle image channel (MSD reads its order from
            ``dataset.json``; NIfTI case folders name their files).
        skip_bad: skip (with a warning) cases whose files are incomplete instead of raising.
        convention: label convention overriding the format's default, e.g. ``brats2024``.
        mask_order: what each Kaggle one-hot mask channel holds (``ncr``, ``ed``, ``et``).
    """
    root = _existing_dir(root)
    _check_options(root, fmt, channel_order, convention)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "kaggle-h5":
        order = check_mask_order(mask_order)
        refs = _list_kaggle(root, tuple(channel_order), skip_bad, order)
    else:
        if tuple(channel_order) != MODALITIES:
            log.warning("channel_order is only used for kaggle-h5; %s files name it", fmt)
        lister = _list_brats if fmt == "brats" else _list_msd
        refs = lister(root, labelled, skip_bad, convention)
    return sorted(refs, key=lambda ref: ref.case_id)


def read_any(
    path: str | Path,
    fmt: str = "auto",
    labelled: bool | None = None,
    *,
    convention: str | None = None,
) -> Case:
    """Read one case for prediction: a BraTS case folder or an MSD 4D image file.

    ``labelled`` None reads the segmentation when there is one (an MSD image's label is looked
    up in ``../labelsTr``), True requires it, False ignores it.
    """
    path = Path(path)
    _check_options(path, fmt, MODALITIES, convention)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt == "kaggle-h5":
        raise DataError(
            f"{path}: read_any reads one NIfTI case; list Kaggle volumes with list_cases"
        )
    if path.is_dir():
        if fmt == "msd":
            raise DataError(f"{path}: expected an MSD 4D image file, got a folder")
        if not _is_case_dir(path):
            raise DataError(
                f"{path}: not a BraTS case folder (expected {path.name}_flair.nii.gz, ... or "
                f"{path.name}-t2f.nii.gz, ...)"
            )
        ref = _brats_ref(path, labelled, convention)
    else:
        if fmt == "brats":
            raise DataError(f"{path}: expected a BraTS case folder, got a file")
        ref = _msd_ref(path, labelled, convention)
    return ref.load()


# ------------------------------------------------------------------------------- helpers


def _existing_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    return root


def _check_options(
    where: Path, fmt: str, channel_order: Iterable[str], convention: str | None
) -> None:
    """Argument checks shared by the entry points; problems are DataErrors naming ``where``."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    if sorted(channel_order) != sorted(MODALITIES):
        raise DataError(
            f"{where}: channel_order {tuple(channel_order)} must name each of "
            f"{', '.join(MODALITIES)} once"
        )
    if convention is not None and convention not in CONVENTIONS:
        raise DataError(
            f"{where}: unknown label convention {convention!r} (expected {sorted(CONVENTIONS)})"
        )


def _subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``."""
    with os.scandir(folder) as entries:
        return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


def nifti_files(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the NIfTI files in ``folder`` (``.nii.gz`` preferred over ``.nii``);
    hidden files such as macOS ``._`` junk are ignored."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            for suffix in SUFFIXES:  # ".nii.gz" is tried first
                if entry.name.endswith(suffix):
                    stem = entry.name[: -len(suffix)]
                    if suffix == ".nii.gz" or stem not in found:
                        found[stem] = Path(entry.path)
                    break
    return found


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(n) if n == start else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def _note_unlabelled(root: Path, ids: list[str]) -> None:
    if ids:
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        log.info(
            "%s: skipped %d cases without a segmentation (prediction inputs): %s",
            root,
            len(ids),
            shown,
        )


# ------------------------------------------------------------------------- Kaggle h5


def _has_kaggle_slices(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(KAGGLE_NAME.fullmatch(e.name) for e in entries)


def _kaggle_dir(root: Path) -> Path | None:
    """The folder holding the ``volume_*_slice_*.h5`` files, if ``root`` leads to one."""
    for sub in KAGGLE_DIRS:
        folder = root / sub
        if folder.is_dir() and _has_kaggle_slices(folder):
            return folder
    return None


def _list_kaggle(
    root: Path, channel_order: tuple[str, ...], skip_bad: bool, mask_order: tuple[str, ...]
) -> list[CaseRef]:
    folder = _kaggle_dir(root)
    if folder is None:
        raise DataError(f"{root}: no Kaggle slices volume_<V>_slice_<S>.h5 found")
    volumes: dict[int, dict[int, list[Path]]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = KAGGLE_NAME.fullmatch(entry.name)
            if match and entry.is_file():
                slices = volumes.setdefault(int(match[1]), {})
                slices.setdefault(int(match[2]), []).append(Path(entry.path))
    if not volumes:
        raise DataError(f"{folder}: no Kaggle slice files volume_<V>_slice_<S>.h5")
    # Every volume should have slices 0..N-1, N the largest count in the set (155 for BraTS).
    count = max(max(slices) for slices in volumes.values()) + 1
    refs = []
    for volume, slices in volumes.items():
        problem = _volume_problem(volume, slices, count)
        if problem:
            message = f"{folder / f'volume_{volume}_slice_*.h5'}: {problem}"
            if not skip_bad:
                raise DataError(message)
            log.warning("skipping %s", message)
            continue
        paths = tuple(slices[s][0] for s in range(count))
        cid = f"volume_{volume:03d}"
        refs.append(CaseRef(cid, "kaggle-h5", paths, True, "brats2020", channel_order, mask_order))
    return refs


def _volume_problem(volume: int, slices: dict[int, list[Path]], count: int) -> str | None:
    """Why the slice files of a volume do not make a volume, or None."""
    missing = sorted(set(range(count)) - set(slices))
    if missing:
        return f"volume {volume} is missing slices {_ranges(missing)} (of 0-{count - 1})"
    doubled = sorted(s for s, paths in slices.items() if len(paths) > 1)
    if doubled:
        names = ", ".join(p.name for p in slices[doubled[0]])
        return f"volume {volume} has slice {doubled[0]} twice ({names})"
    return None


def _read_h5_slice(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``image (H, W, 4)`` and ``mask (H, W, 3)`` of one slice file, checked."""
    try:
        with h5py.File(path, "r") as f:
            image, mask = (_dataset(f, path, key) for key in ("image", "mask"))
            if image.ndim != 3 or image.shape[2] != 4 or image.dtype.kind != "f":
                raise DataError(
                    f"{path}: image has shape {image.shape} {image.dtype}, expected (H, W, 4) float"
                )
            if mask.ndim != 3 or mask.shape[2] != 3 or mask.dtype.kind not in "biu":
                raise DataError(
                    f"{path}: mask has shape {mask.shape} {mask.dtype}, expected (H, W, 3) integer"
                )
            if mask.shape[:2] != image.shape[:2]:
                raise DataError(
                    f"{path}: mask shape {mask.shape} does not match image {image.shape}"
                )
            pixels, hot = image[()], mask[()]
    except DataError:
        raise
    except Exception as err:  # h5py raises OSError, KeyError, ... for broken files
        raise DataError(f"{path}: cannot read HDF5 ({err})") from None
    if not np.isfinite(pixels).all():
        raise DataError(f"{path}: NaN or inf in image")
    return pixels, hot


def _dataset(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    item = f.get(key)
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{path}: no dataset {key!r} (found {sorted(f.keys())})")
    return item


def _load_kaggle(ref: CaseRef) -> Case:
    order = [ref.channel_order.index(m) for m in MODALITIES]  # stored channel of each modality
    depth = len(ref.paths)
    image = seg = None
    for z, path in enumerate(ref.paths):
        pixels, hot = _read_h5_slice(path)
        if image is None:
            first, shape = path, pixels.shape
            image = np.empty((4, *shape[:2], depth), dtype=np.float32)
            seg = np.empty((*shape[:2], depth), dtype=np.uint8)
            block = np.empty((KAGGLE_BLOCK, *shape), dtype=np.float32)
        elif pixels.shape != shape:
            raise DataError(f"{path}: image shape {pixels.shape} differs from {first.name}")
        # Gather slices in a small block, then move the block into place: writing 16
        # neighbouring z at a time is far faster than one strided slice at a time.
        block[z % KAGGLE_BLOCK] = pixels
        seg[..., z] = from_one_hot(hot, str(path), ref.mask_order)
        if z % KAGGLE_BLOCK == KAGGLE_BLOCK - 1 or z == depth - 1:
            start = z - z % KAGGLE_BLOCK
            image[..., start : z + 1] = block[: z + 1 - start].transpose(3, 1, 2, 0)[order]
    return Case(ref.case_id, image, seg, BRATS_AFFINE.copy())


# ------------------------------------------------------------------------ BraTS NIfTI


def _is_case_dir(folder: Path) -> bool:
    """A folder holding ``<folder>_*.nii[.gz]`` or ``<folder>-*.nii[.gz]`` files."""
    if folder.name.startswith(".") or not folder.is_dir():
        return False
    prefixes = (f"{folder.name}_", f"{folder.name}-")
    with os.scandir(folder) as entries:
        return any(e.name.startswith(prefixes) and e.name.endswith(SUFFIXES) for e in entries)


def _brats_case_dirs(root: Path) -> list[Path]:
    """Case folders in ``root``, else in its sub-folders (``MICCAI_BraTS2020_TrainingData/``),
    else ``root`` itself when it is one."""
    cases = [p for p in _subdirs(root) if _is_case_dir(p)]
    if not cases:
        cases = [p for sub in _subdirs(root) for p in _subdirs(sub) if _is_case_dir(p)]
    if not cases and _is_case_dir(root):
        cases = [root]
    return cases


def _odd_seg(folder: Path, taken: list[Path]) -> Path | None:
    """A segmentation under another name (BraTS 2020 case 355: ``W39_1998.09.19_Segm.nii``)."""
    names = {p.name for p in taken}
    found = [
        p for p in nifti_files(folder).values() if p.name not in names and "seg" in p.name.lower()
    ]
    if len(found) > 1:
        raise DataError(
            f"{folder}: several candidate segmentations {sorted(p.name for p in found)}"
        )
    if found:
        log.debug("%s: using %s as the segmentation", folder, found[0].name)
    return found[0] if found else None


def _brats_ref(folder: Path, labelled: bool | None, convention: str | None) -> CaseRef:
    """The files of a case folder; ``labelled`` True requires a seg, False ignores it."""
    cid = folder.name
    new = any(find_nifti(folder, f"{cid}-{s}") for s in (*BRATS2023_NAMES.values(), "seg"))
    if new:
        stems = {m: f"{cid}-{BRATS2023_NAMES[m]}" for m in MODALITIES}
    else:
        stems = {m: f"{cid}_{m}" for m in MODALITIES}
    paths = []
    for mod, stem in stems.items():
        path = find_nifti(folder, stem)
        if path is None:
            raise DataError(f"{folder}: missing modality {mod} ({stem}.nii.gz)")
        paths.append(path)
    seg_stem = f"{cid}-seg" if new else f"{cid}_seg"
    seg = None
    if labelled is not False:
        seg = find_nifti(folder, seg_stem) or _odd_seg(folder, paths)
        if seg is None and labelled:
            raise DataError(f"{folder}: missing segmentation {seg_stem}.nii.gz")
    convention = convention or ("brats2023" if new else "brats2020")
    files = (*paths, seg) if seg else tuple(paths)
    return CaseRef(cid, "brats", files, seg is not None, convention)


def _list_brats(
    root: Path, labelled: bool, skip_bad: bool, convention: str | None
) -> list[CaseRef]:
    folders = _brats_case_dirs(root)
    if not folders:
        raise DataError(f"{root}: no BraTS case folders (ID/ID_flair.nii.gz or ID/ID-t2f.nii.gz)")
    refs, unlabelled = [], []
    for folder in folders:
        try:
            ref = _brats_ref(folder, None, convention)
        except DataError as err:
            if not skip_bad:
                raise
            log.warning("skipping %s", err)
            continue
        if labelled and not ref.labelled:
            unlabelled.append(ref.case_id)
            continue
        refs.append(ref)
    _note_unlabelled(root, sorted(unlabelled))
    return refs


def _load_brats(ref: CaseRef) -> Case:
    image, affine = read_images(ref.paths[:4])
    seg = None
    if ref.labelled:
        seg = read_seg(ref.paths[4], image.shape[1:], ref.paths[0].name, ref.convention)
    return Case(ref.case_id, image, seg, affine)


# ------------------------------------------------------------------------------- MSD


def _msd_dir(root: Path) -> Path | None:
    """The Task01 folder (holding ``imagesTr/`` or ``imagesTs/``): ``root`` or a child."""
    for folder in (root, root / "Task01_BrainTumour"):
        if (folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir():
            return folder
    return None


def _msd_order(task: Path) -> tuple[str, ...]:
    """Modality of each image channel from ``dataset.json``, else the documented order."""
    path = task / "dataset.json"
    if not path.is_file():
        return MSD_ORDER
    try:
        modality = json.loads(path.read_text())["modality"]
        names = [modality[k] for k in sorted(modality, key=int)]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: cannot read the modality table ({err})") from None
    order = tuple(MSD_NAMES.get(str(n).lower(), str(n)) for n in names)
    if sorted(order) != sorted(MODALITIES):
        raise DataError(f"{path}: modalities {names} are not FLAIR, T1w, T1gd, T2w")
    return order


def _msd_ref(image: Path, labelled: bool | None, convention: str | None) -> CaseRef:
    """Case of one MSD image; its label is ``../labelsTr/<same name>``."""
    stem = next((image.name[: -len(s)] for s in SUFFIXES if image.name.endswith(s)), None)
    if stem is None:
        raise DataError(f"{image}: not a NIfTI file (.nii.gz or .nii)")
    task = image.parent.parent
    label = None
    if labelled is not False:
        label = find_nifti(task / "labelsTr", stem)
        if label is None and labelled:
            raise DataError(f"{image}: no label {task / 'labelsTr' / image.name}")
    files = (image, label) if label else (image,)
    return CaseRef(stem, "msd", files, label is not None, convention or "msd", _msd_order(task))


def _list_msd(root: Path, labelled: bool, skip_bad: bool, convention: str | None) -> list[CaseRef]:
    """Cases of imagesTr (with labelsTr) and imagesTs; ``skip_bad`` has nothing to skip here,
    as the files are only checked when loaded."""
    task = _msd_dir(root)
    if task is None:
        raise DataError(f"{root}: no MSD imagesTr/ or imagesTs/ folder")
    order = _msd_order(task)
    labels = nifti_files(task / "labelsTr")
    refs, unlabelled = [], []
    for folder in ("imagesTr", "imagesTs"):
        for cid, image in nifti_files(task / folder).items():
            label = labels.get(cid) if folder == "imagesTr" else None
            if labelled and label is None:
                unlabelled.append(cid)
                continue
            files = (image, label) if label else (image,)
            refs.append(CaseRef(cid, "msd", files, label is not None, convention or "msd", order))
    _note_unlabelled(root, sorted(unlabelled))
    return refs


def _load_msd(ref: CaseRef) -> Case:
    path = ref.paths[0]
    data, affine = read_nifti(path)
    if data.ndim != 4 or data.shape[3] != 4:
        raise DataError(f"{path}: expected a 4D image (X, Y, Z, 4), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: NaN or inf voxels")
    order = [ref.channel_order.index(m) for m in MODALITIES]
    image = np.ascontiguousarray(data.transpose(3, 0, 1, 2)[order])
    seg = None
    if ref.labelled:
        seg = read_seg(ref.paths[1], image.shape[1:], path.name, ref.convention)
    return Case(ref.case_id, image, seg, np.asarray(affine))
