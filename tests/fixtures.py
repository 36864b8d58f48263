"""Small data sets in the exact layout of each BraTS source, and a split check, for tests.

Every volume holds an ellipsoidal "brain" (0 outside) and a blob tumour with all three classes:
necrosis inside an enhancing rim inside edema (optionally a resection cavity beside it). Inside
the brain each modality sits at its own level ``BASE`` (FLAIR ~100, T1 ~200, T1ce ~300, T2 ~400)
so tests can tell channels apart, plus tumour contrasts that follow MRI (bright edema in FLAIR
and T2, bright rim in T1ce, bright necrosis in T2) and a little noise.

Each writer takes a folder and a seed or ``numpy.random.Generator`` and returns the paths of
what it wrote: case folders (BraTS), image files (MSD) or slice files per volume (Kaggle).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

MODALITIES = ("flair", "t1", "t1ce", "t2")
BASE = {"flair": 100.0, "t1": 200.0, "t1ce": 300.0, "t2": 400.0}
# Offset from BASE inside each class: necrosis, edema, enhancing, resection cavity.
CONTRAST = {
    "flair": (10.0, 60.0, 40.0, -60.0),
    "t1": (-50.0, -30.0, -10.0, -80.0),
    "t1ce": (-40.0, -20.0, 90.0, -80.0),
    "t2": (90.0, 60.0, 30.0, 150.0),
}
# Class codes used inside the fixtures: 0 background, 1 NCR, 2 ED, 3 ET, 4 resection cavity.
NCR, ED, ET, CAVITY = 1, 2, 3, 4
# Class code -> value written in each source's segmentation.
RAW_LABELS = {
    "brats2020": {NCR: 1, ED: 2, ET: 4},
    "brats2023": {NCR: 1, ED: 2, ET: 3, CAVITY: 4},
    "msd": {ED: 1, NCR: 2, ET: 3},
}
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
BRATS2023_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
CASE_355_SEG = "W39_1998.09.19_Segm.nii"
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)

Seed = int | np.random.Generator


def make_volume(
    rng: Seed, shape: tuple[int, int, int] = (24, 24, 8), cavity: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Images ``{modality: (X, Y, Z) float32}`` and class codes ``(X, Y, Z) uint8``."""
    rng = np.random.default_rng(rng)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    # Distances in units of a 24 x 24 x 8 grid, so bigger fixtures scale the same picture.
    unit = np.array([shape[0] / 24, shape[1] / 24, shape[2] / 8], dtype=np.float32)

    def dist(point: np.ndarray) -> np.ndarray:
        return np.sqrt(sum(((g - c) / u) ** 2 for g, c, u in zip(grid, point, unit, strict=True)))

    brain = (
        sum(
            ((g - c) / (r * n)) ** 2
            for g, c, r, n in zip(grid, centre, (0.45, 0.45, 0.7), shape, strict=True)
        )
        <= 1
    )
    tumour = centre + rng.uniform(-1.5, 1.5, 3) * unit * np.array([1, 1, 0.3], dtype=np.float32)
    d = dist(tumour)
    classes = np.zeros(shape, dtype=np.uint8)
    classes[d < 5.0] = ED
    classes[d < 3.0] = ET
    classes[d < 1.6] = NCR
    if cavity:
        classes[dist(centre + np.array([-8.0, 6.0, 0.0], dtype=np.float32) * unit) < 1.5] = CAVITY
    classes[~brain] = 0

    images = {}
    for mod in MODALITIES:
        offsets = np.array((0.0, *CONTRAST[mod]), dtype=np.float32)
        noise = rng.uniform(-5, 5, shape).astype(np.float32)
        images[mod] = np.where(brain, BASE[mod] + offsets[classes] + noise, 0).astype(np.float32)
    return images, classes


def raw_labels(classes: np.ndarray, convention: str) -> np.ndarray:
    """Class codes -> the values a source of ``convention`` stores (uint8)."""
    lut = np.zeros(5, dtype=np.uint8)
    for code, value in RAW_LABELS[convention].items():
        lut[code] = value
    return lut[classes]


def _save(data: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(data, BRATS_AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def _write_case(
    folder: Path,
    stems: dict[str, str],
    seg_name: str | None,
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    ext: str,
    convention: str,
    float_seg: bool = False,
    cavity: bool = False,
) -> Path:
    """One NIfTI case folder: int16 modality files ``stems[m] + ext`` and the seg ``seg_name``."""
    folder.mkdir(parents=True, exist_ok=True)
    images, classes = make_volume(rng, shape, cavity)
    for mod in MODALITIES:
        _save(np.rint(images[mod]).astype(np.int16), folder / f"{stems[mod]}{ext}")
    if seg_name:
        seg = raw_labels(classes, convention).astype(np.float32 if float_seg else np.uint8)
        _save(seg, folder / seg_name)
    return folder


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_brats2020(
    root: Path,
    ids: Sequence[int] = (1, 2, 355),
    rng: Seed = 0,
    ext: str = ".nii.gz",
    float_seg: bool = False,
    validation: Sequence[int] = (),
    shape: tuple[int, int, int] = (24, 24, 8),
) -> list[Path]:
    """``BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}{ext}`` case folders.

    Case 355 gets its real quirk: the seg is ``W39_1998.09.19_Segm.nii``. ``validation`` adds
    ``BraTS20_Validation_XXX`` folders without seg. ``name_mapping.csv`` and
    ``survival_info.csv`` sit beside the cases. Returns the case folders.
    """
    rng, root = np.random.default_rng(rng), Path(root)
    folders = []
    for i in ids:
        cid = f"BraTS20_Training_{i:03d}"
        seg = CASE_355_SEG if i == 355 else f"{cid}_seg{ext}"
        stems = {m: f"{cid}_{m}" for m in MODALITIES}
        folders.append(_write_case(root / cid, stems, seg, rng, shape, ext, "brats2020", float_seg))
    for i in validation:
        cid = f"BraTS20_Validation_{i:03d}"
        stems = {m: f"{cid}_{m}" for m in MODALITIES}
        folders.append(_write_case(root / cid, stems, None, rng, shape, ext, "brats2020"))
    names = [f"BraTS20_Training_{i:03d}" for i in ids]
    _write_csv(
        root / "name_mapping.csv",
        [
            "Grade",
            "BraTS_2017_subject_ID",
            "BraTS_2018_subject_ID",
            "TCGA_TCIA_subject_ID",
            "BraTS_2019_subject_ID",
            "BraTS_2020_subject_ID",
        ],
        [["HGG", "NA", "NA", "NA", "NA", name] for name in names],
    )
    _write_csv(
        root / "survival_info.csv",
        ["Brats20ID", "Age", "Survival_days", "Extent_of_Resection"],
        [[name, 60.5, 300, "GTR"] for name in names],
    )
    return folders


def write_brats2021(
    root: Path,
    ids: Sequence[int] = (0, 2),
    rng: Seed = 0,
    ext: str = ".nii.gz",
    validation: Sequence[int] = (),
    shape: tuple[int, int, int] = (24, 24, 8),
) -> list[Path]:
    """``BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz``, labels 1/2/4;
    ``validation`` ids get no seg. Returns the case folders."""
    rng, root = np.random.default_rng(rng), Path(root)
    folders = []
    for i, labelled in [(i, True) for i in ids] + [(i, False) for i in validation]:
        cid = f"BraTS2021_{i:05d}"
        stems = {m: f"{cid}_{m}" for m in MODALITIES}
        seg = f"{cid}_seg{ext}" if labelled else None
        folders.append(_write_case(root / cid, stems, seg, rng, shape, ext, "brats2020"))
    return folders


def write_brats2023(
    root: Path,
    ids: Sequence[int] = (0, 2),
    rng: Seed = 0,
    with_cavity: bool = False,
    validation: Sequence[int] = (),
    shape: tuple[int, int, int] = (24, 24, 8),
) -> list[Path]:
    """``BraTS-GLI-XXXXX-000/BraTS-GLI-XXXXX-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, labels 1/2/3
    (and 4 = resection cavity, BraTS 2024, with ``with_cavity``); ``validation`` ids get no
    seg. Returns the case folders."""
    rng, root = np.random.default_rng(rng), Path(root)
    folders = []
    for i, labelled in [(i, True) for i in ids] + [(i, False) for i in validation]:
        cid = f"BraTS-GLI-{i:05d}-000"
        stems = {m: f"{cid}-{BRATS2023_NAMES[m]}" for m in MODALITIES}
        seg = f"{cid}-seg.nii.gz" if labelled else None
        folders.append(
            _write_case(
                root / cid, stems, seg, rng, shape, ".nii.gz", "brats2023", False, with_cavity
            )
        )
    return folders


def write_msd(
    root: Path,
    ids: Sequence[int] = (1, 2),
    rng: Seed = 0,
    test_ids: Sequence[int] = (3,),
    shape: tuple[int, int, int] = (24, 24, 8),
) -> list[Path]:
    """MSD Task01_BrainTumour in ``root``: ``imagesTr/BRATS_XXX.nii.gz`` 4D (X, Y, Z, 4) float32
    in channel order FLAIR, T1w, T1gd, T2w, ``labelsTr/`` (1 edema, 2 non-enhancing,
    3 enhancing), unlabelled ``imagesTs/``, ``dataset.json`` and macOS ``._`` junk files.
    Returns the image files (training, then test)."""
    rng, root = np.random.default_rng(rng), Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    images = []
    for i, folder in [(i, "imagesTr") for i in ids] + [(i, "imagesTs") for i in test_ids]:
        name = f"BRATS_{i:03d}.nii.gz"
        volume, classes = make_volume(rng, shape)
        stacked = np.stack([volume[m] for m in MODALITIES], axis=-1)
        images.append(_save(stacked, root / folder / name))
        if folder == "imagesTr":
            _save(raw_labels(classes, "msd"), root / "labelsTr" / name)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub / f"._BRATS_{ids[0]:03d}.nii.gz").write_bytes(APPLE_DOUBLE)
    dataset = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": len(ids),
        "numTest": len(test_ids),
        "training": [
            {
                "image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                "label": f"./labelsTr/BRATS_{i:03d}.nii.gz",
            }
            for i in ids
        ],
        "test": [f"./imagesTs/BRATS_{i:03d}.nii.gz" for i in test_ids],
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return images


def write_kaggle_h5(
    root: Path,
    volumes: Sequence[int] = (1, 2),
    rng: Seed = 0,
    slices: int = 8,
    size: int = 24,
    mask_order: Sequence[str] = ("ncr", "ed", "et"),
) -> dict[int, list[Path]]:
    """The Kaggle "BraTS2020 training data" layout in ``root``::

        root/BraTS20 Training Metadata.csv        (pixel counts, rows shuffled)
        root/BraTS2020_training_data/content/data/meta_data.csv
        root/BraTS2020_training_data/content/data/volume_{V}_slice_{S}.h5

    Each slice: ``image`` (size, size, 4) float64 in channel order FLAIR, T1, T1ce, T2 and
    ``mask`` (size, size, 3) uint8 one-hot, channels in ``mask_order`` (default NCR, ED, ET).
    Returns the slice files per volume.
    """
    rng, root = np.random.default_rng(rng), Path(root)
    data = root / "BraTS2020_training_data" / "content" / "data"
    data.mkdir(parents=True, exist_ok=True)
    written, meta, counts = {}, [], []
    for volume in volumes:
        images, classes = make_volume(rng, (size, size, slices))
        stack = np.stack([images[m] for m in MODALITIES], axis=-1).astype(np.float64)
        codes = {"ncr": NCR, "ed": ED, "et": ET}
        onehot = np.stack([classes == codes[n] for n in mask_order], axis=-1).astype(np.uint8)
        written[volume] = []
        for s in range(slices):
            path = data / f"volume_{volume}_slice_{s}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("image", data=stack[:, :, s])
                f.create_dataset("mask", data=onehot[:, :, s])
            written[volume].append(path)
            target = int(onehot[:, :, s].any())
            row = [f"/content/data/{path.name}", target, volume, s]
            meta.append(row)
            pixels = onehot[:, :, s].sum((0, 1)).tolist()
            counts.append([*row, *pixels, float((stack[:, :, s] == 0).all(-1).mean())])
    _write_csv(data / "meta_data.csv", ["slice_path", "target", "volume", "slice"], meta)
    header = [
        "slice_path",
        "target",
        "volume",
        "slice",
        "label0_pxl_cnt",
        "label1_pxl_cnt",
        "label2_pxl_cnt",
        "background_ratio",
    ]
    shuffled = [counts[i] for i in rng.permutation(len(counts))]
    _write_csv(root / "BraTS20 Training Metadata.csv", header, shuffled)
    return written


def split_by_patient(dm) -> dict[str, set[str]]:
    """Case ids per split after ``dm.setup``; checks every split is filled and none shares a
    patient with training."""
    dm.setup("fit")
    dm.setup("test")
    cases = {k: {c for c, _ in dm.index[k]} for k in ("train", "val", "test")}
    assert cases["train"] and cases["val"] and cases["test"]
    assert not (cases["train"] & cases["val"]) and not (cases["train"] & cases["test"])
    return cases
