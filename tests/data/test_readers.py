"""Readers for every source format: detection, layout quirks, channel order, labels, bad input."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from tests import fixtures as fx
from tumorseg.cli import channels
from tumorseg.core.errors import DataError
from tumorseg.core.labels import REGIONS, from_canonical, from_one_hot, to_canonical
from tumorseg.data.case import BRATS_AFFINE, MODALITIES
from tumorseg.data.readers import detect_format, list_cases, read_any

# Raw label values of each region under each source's own convention (written out by hand).
RAW_REGIONS = {
    "brats2020": {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)},
    "brats2023": {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)},
    "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)},
}


def raw_counts(path: Path, convention: str) -> dict[str, int]:
    raw = np.asarray(nib.load(path).dataobj)
    return {r: int(np.isin(raw, v).sum()) for r, v in RAW_REGIONS[convention].items()}


def kaggle_counts(paths: list[Path]) -> dict[str, int]:
    masks = []
    for path in paths:
        with h5py.File(path, "r") as f:
            masks.append(f["mask"][()].astype(bool))
    mask = np.stack(masks)
    return {
        "wt": int(mask.any(-1).sum()),
        "tc": int((mask[..., 0] | mask[..., 2]).sum()),
        "et": int(mask[..., 2].sum()),
    }


def case_counts(seg: np.ndarray) -> dict[str, int]:
    return {r: int(np.isin(seg, v).sum()) for r, v in REGIONS.items()}


def assert_levels(image: np.ndarray, stored: tuple[str, ...] = MODALITIES) -> None:
    """Channel k of ``image`` holds the fixture level of modality ``stored[k]``."""
    assert image.shape[0] == 4 and image.dtype == np.float32
    for k, mod in enumerate(stored):
        inside = image[k][image[k] != 0]
        assert abs(float(np.median(inside)) - fx.BASE[mod]) < 15, (k, mod)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small data set per layout (read-only)."""
    base = tmp_path_factory.mktemp("sets")
    fx.write_kaggle_h5(base / "kaggle", volumes=(1, 2), slices=12)
    fx.write_brats2020(base / "brats2020", ids=(1, 2, 355), validation=(1,))
    fx.write_brats2021(base / "brats2021", ids=(0, 2), validation=(5,))
    fx.write_brats2023(base / "brats2023", ids=(0, 2), validation=(7,))
    fx.write_brats2023(base / "brats2024", ids=(1,), with_cavity=True)
    fx.write_msd(base / "msd" / "Task01_BrainTumour", ids=(1, 2), test_ids=(3,))
    return {p.name: p for p in base.iterdir()}


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("name", "sub", "fmt"),
    [
        ("kaggle", "", "kaggle-h5"),
        ("kaggle", "BraTS2020_training_data", "kaggle-h5"),
        ("kaggle", "BraTS2020_training_data/content/data", "kaggle-h5"),
        ("brats2020", "", "brats"),
        ("brats2021", "", "brats"),
        ("brats2023", "", "brats"),
        ("msd", "", "msd"),
        ("msd", "Task01_BrainTumour", "msd"),
    ],
)
def test_detect_format(sets: dict[str, Path], name: str, sub: str, fmt: str) -> None:
    assert detect_format(sets[name] / sub) == fmt
    assert list_cases(sets[name] / sub, fmt=fmt)  # the explicit format lists the same layout


def test_detect_format_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"empty directory"):
        detect_format(tmp_path)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"not a recognised BraTS layout \(looked for .*MSD"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        detect_format(tmp_path / "missing")


def test_format_override_and_unknown(sets: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="no MSD imagesTr"):
        list_cases(sets["brats2020"], fmt="msd")
    with pytest.raises(DataError, match="unknown format 'nifti'"):
        list_cases(sets["brats2020"], fmt="nifti")
    with pytest.raises(DataError, match="channel_order"):
        list_cases(sets["kaggle"], channel_order=("flair", "t1", "t1", "t2"))


# --------------------------------------------------------------------------------- Kaggle


def test_kaggle_reader(sets: dict[str, Path]) -> None:
    refs = list_cases(sets["kaggle"])
    assert [r.case_id for r in refs] == ["volume_001", "volume_002"]
    ref = refs[0]
    # Slices in numeric order (lexical order would put slice_10 before slice_2).
    assert [p.name for p in ref.paths] == [f"volume_1_slice_{s}.h5" for s in range(12)]
    case = ref.load()
    assert case.image.shape == (4, 24, 24, 12) and case.seg.shape == (24, 24, 12)
    assert case.seg.dtype == np.uint8
    np.testing.assert_array_equal(case.affine, BRATS_AFFINE)
    assert_levels(case.image)
    with h5py.File(ref.paths[10], "r") as f:
        np.testing.assert_allclose(case.image[:, :, :, 10], f["image"][()].transpose(2, 0, 1))
    assert case_counts(case.seg) == kaggle_counts(list(ref.paths))
    assert all(case_counts(case.seg).values())


def test_kaggle_channel_order(sets: dict[str, Path]) -> None:
    order = ("t2", "t1ce", "t1", "flair")
    case = list_cases(sets["kaggle"], channel_order=order)[0].load()
    # Stored channel k is read as modality order[k]: e.g. stored FLAIR (k=0) lands at t2.
    for k, mod in enumerate(order):
        assert_levels(case.image[[MODALITIES.index(mod)]].repeat(4, 0), (MODALITIES[k],) * 4)


def test_kaggle_missing_slices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    written = fx.write_kaggle_h5(tmp_path, volumes=(1, 2), slices=8)
    for path in written[2][3:5]:
        path.unlink()
    with pytest.raises(DataError, match=r"volume_2_slice_\*\.h5: volume 2 is missing slices 3-4"):
        list_cases(tmp_path)
    with caplog.at_level(logging.WARNING):
        refs = list_cases(tmp_path, skip_bad=True)
    assert [r.case_id for r in refs] == ["volume_001"]
    assert "missing slices 3-4" in caplog.text


def _rewrite(path: Path, **datasets: np.ndarray | None) -> None:
    """Replace datasets of an h5 slice (None drops one)."""
    with h5py.File(path, "r") as f:
        content = {k: f[k][()] for k in f}
    content.update(datasets)
    with h5py.File(path, "w") as f:
        for key, value in content.items():
            if value is not None:
                f.create_dataset(key, data=value)


def _mask(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["mask"][()]


def _two_hot(path: Path) -> None:
    mask = _mask(path)
    mask[5, 5, :2] = 1
    _rewrite(path, mask=mask)


def _value_two(path: Path) -> None:
    mask = _mask(path)
    mask[5, 5] = (2, 0, 0)
    _rewrite(path, mask=mask)


def _nan(path: Path) -> None:
    with h5py.File(path, "r") as f:
        image = f["image"][()]
    image[3, 3, 1] = np.nan
    _rewrite(path, image=image)


KAGGLE_BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "not hdf5": (lambda p: p.write_text("not an hdf5 file"), "cannot read HDF5"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:800]), "cannot read HDF5"),
    "no image": (lambda p: _rewrite(p, image=None), "no dataset 'image'"),
    "no mask": (lambda p: _rewrite(p, mask=None), "no dataset 'mask'"),
    "image channels": (lambda p: _rewrite(p, image=np.ones((24, 24, 3))), "expected \\(H, W, 4\\)"),
    "image dtype": (
        lambda p: _rewrite(p, image=np.ones((24, 24, 4), np.int16)),
        "expected \\(H, W, 4\\) float",
    ),
    "mask channels": (
        lambda p: _rewrite(p, mask=np.zeros((24, 24, 4), np.uint8)),
        "expected \\(H, W, 3\\)",
    ),
    "mask dtype": (
        lambda p: _rewrite(p, mask=np.zeros((24, 24, 3), np.float32)),
        "expected \\(H, W, 3\\) integer",
    ),
    "image size": (
        lambda p: _rewrite(p, image=np.ones((20, 24, 4)), mask=np.zeros((20, 24, 3), np.uint8)),
        "image shape",
    ),
    "nan": (_nan, "NaN or inf"),
    "two channels": (_two_hot, "not one-hot .*two or more channels"),
    "value 2": (_value_two, "not one-hot \\(values \\[2\\]"),
}


@pytest.mark.parametrize("kind", KAGGLE_BREAKS)
def test_kaggle_bad_slice(tmp_path: Path, kind: str) -> None:
    paths = fx.write_kaggle_h5(tmp_path, volumes=(1,), slices=4)[1]
    breaker, problem = KAGGLE_BREAKS[kind]
    breaker(paths[2])
    ref = list_cases(tmp_path)[0]
    with pytest.raises(DataError, match=f"volume_1_slice_2.h5: .*{problem}"):
        ref.load()


# ---------------------------------------------------------------------------- BraTS NIfTI


def test_brats2020_reader(sets: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    root = sets["brats2020"]
    with caplog.at_level(logging.INFO):
        refs = list_cases(root)
    ids = ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_355"]
    assert [r.case_id for r in refs] == ids  # CSVs ignored, validation case skipped
    assert "skipped 1 cases without a segmentation" in caplog.text
    assert "BraTS20_Validation_001" in caplog.text
    assert refs[2].paths[-1].name == fx.CASE_355_SEG
    for ref in refs:
        case = ref.load()
        assert case.image.shape == (4, 24, 24, 8) and case.seg.shape == (24, 24, 8)
        assert_levels(case.image)
        assert case_counts(case.seg) == raw_counts(ref.paths[-1], "brats2020")
        np.testing.assert_array_equal(case.affine, BRATS_AFFINE)

    everything = list_cases(root, labelled=False)
    assert [r.case_id for r in everything] == [*ids, "BraTS20_Validation_001"]
    assert everything[-1].load().seg is None


def test_nii_beside_nii_gz_and_float_seg(tmp_path: Path) -> None:
    fx.write_brats2020(tmp_path, ids=(1,), ext=".nii.gz", rng=1)
    fx.write_brats2020(tmp_path, ids=(2,), ext=".nii", float_seg=True, rng=2)
    refs = list_cases(tmp_path, fmt="brats")
    assert [r.paths[0].name for r in refs] == [
        "BraTS20_Training_001_flair.nii.gz",
        "BraTS20_Training_002_flair.nii",
    ]
    assert nib.load(refs[1].paths[-1]).get_data_dtype() == np.float32
    for ref in refs:
        case = ref.load()
        assert_levels(case.image)
        assert case_counts(case.seg) == raw_counts(ref.paths[-1], "brats2020")


def test_brats2021_reader(sets: dict[str, Path]) -> None:
    refs = list_cases(sets["brats2021"])
    assert [r.case_id for r in refs] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert len(list_cases(sets["brats2021"], labelled=False)) == 3
    case = refs[1].load()
    assert_levels(case.image)
    assert case_counts(case.seg) == raw_counts(refs[1].paths[-1], "brats2020")


def test_brats2023_reader(sets: dict[str, Path]) -> None:
    refs = list_cases(sets["brats2023"])
    assert [r.case_id for r in refs] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    assert refs[0].convention == "brats2023"
    # Files in MODALITIES order: t2f (FLAIR) first, then t1n, t1c, t2w.
    assert [p.name.rsplit("-", 1)[1] for p in refs[0].paths] == [
        "t2f.nii.gz",
        "t1n.nii.gz",
        "t1c.nii.gz",
        "t2w.nii.gz",
        "seg.nii.gz",
    ]
    case = refs[0].load()
    assert_levels(case.image)  # t2f lands at index 0, t2w at 3
    assert case_counts(case.seg) == raw_counts(refs[0].paths[-1], "brats2023")
    assert len(list_cases(sets["brats2023"], labelled=False)) == 3


def test_brats2024_cavity(sets: dict[str, Path]) -> None:
    root = sets["brats2024"]
    ref = list_cases(root)[0]
    with pytest.raises(DataError, match=r"-seg.nii.gz: unexpected label value 4 .*brats2024"):
        ref.load()
    ref = list_cases(root, convention="brats2024")[0]
    case = ref.load()
    raw = np.asarray(nib.load(ref.paths[-1]).dataobj)
    assert (raw == 4).any() and not case.seg[raw == 4].any()  # cavity -> background
    assert case_counts(case.seg) == raw_counts(ref.paths[-1], "brats2023")


# ------------------------------------------------------------------------------------ MSD


def test_msd_reader(sets: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    root = sets["msd"]
    with caplog.at_level(logging.INFO):
        refs = list_cases(root)
    assert [r.case_id for r in refs] == ["BRATS_001", "BRATS_002"]  # ._ junk ignored
    assert "BRATS_003" in caplog.text
    assert nib.load(refs[0].paths[0]).shape == (24, 24, 8, 4)
    for ref in refs:
        case = ref.load()
        assert case.image.shape == (4, 24, 24, 8)
        assert_levels(case.image)  # FLAIR, T1w, T1gd, T2w
        assert case_counts(case.seg) == raw_counts(ref.paths[1], "msd")
    everything = list_cases(root, labelled=False)
    assert [r.case_id for r in everything] == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert everything[2].load().seg is None


def test_msd_channel_order_from_dataset_json(tmp_path: Path) -> None:
    fx.write_msd(tmp_path, ids=(1,), test_ids=())
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["modality"] = {"0": "T2w", "1": "t1gd", "2": "T1w", "3": "FLAIR"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    case = list_cases(tmp_path)[0].load()
    # Stored channel 0 (fixture FLAIR level) is now declared T2w.
    assert_levels(case.image, ("t2", "t1ce", "t1", "flair"))


# ------------------------------------------------------------------------------- read_any


def test_read_any(sets: dict[str, Path]) -> None:
    training = sets["brats2020"] / "BraTS20_Training_355"
    validation = sets["brats2020"] / "BraTS20_Validation_001"
    assert read_any(training).seg is not None
    assert read_any(training, labelled=False).seg is None
    assert read_any(validation).seg is None
    with pytest.raises(DataError, match="BraTS20_Validation_001: missing segmentation"):
        read_any(validation, labelled=True)
    case = read_any(sets["brats2023"] / "BraTS-GLI-00002-000", fmt="brats")
    assert_levels(case.image)
    task = sets["msd"] / "Task01_BrainTumour"
    case = read_any(task / "imagesTr" / "BRATS_002.nii.gz")
    assert case.case_id == "BRATS_002" and case.seg is not None
    assert_levels(case.image)
    assert read_any(task / "imagesTs" / "BRATS_003.nii.gz").seg is None
    with pytest.raises(DataError, match="not a BraTS case folder"):
        read_any(task)
    with pytest.raises(DataError, match="expected a BraTS case folder"):
        read_any(task / "imagesTs" / "BRATS_003.nii.gz", fmt="brats")
    with pytest.raises(DataError, match="no such file"):
        read_any(task / "nothing.nii.gz")


# -------------------------------------------------------------------------- NIfTI errors


def _save_like(path: Path, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _modality(folder: Path, mod: str) -> Path:
    return folder / f"{folder.name}_{mod}.nii.gz"


def _seg_value_3(folder: Path) -> Path:
    path = folder / f"{folder.name}_seg.nii.gz"
    seg = np.asarray(nib.load(path).dataobj).copy()
    seg[0, 0, 0] = 3
    _save_like(path, seg)
    return path


def _shape(folder: Path) -> Path:
    path = _modality(folder, "t2")
    _save_like(path, np.ones((24, 24, 7), np.int16))
    return path


def _affine(folder: Path) -> Path:
    path = _modality(folder, "t1")
    _save_like(path, np.asarray(nib.load(path).dataobj), np.diag([2.0, 2.0, 2.0, 1.0]))
    return path


def _seg_shape(folder: Path) -> Path:
    path = folder / f"{folder.name}_seg.nii.gz"
    _save_like(path, np.zeros((24, 24, 9), np.uint8))
    return path


def _nan_voxel(folder: Path) -> Path:
    path = _modality(folder, "flair")
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    data[1, 1, 1] = np.nan
    _save_like(path, data)
    return path


def _garbage(folder: Path) -> Path:
    path = _modality(folder, "t1")
    path.write_bytes(b"\x1f\x8b garbage")
    return path


def _no_t1ce(folder: Path) -> Path:
    path = _modality(folder, "t1ce")
    path.unlink()
    return path


NIFTI_BREAKS = {
    "unknown label": (_seg_value_3, "unexpected label value 3"),
    "shape": (_shape, "differs from"),
    "affine": (_affine, "differs from"),
    "seg shape": (_seg_shape, "differs from"),
    "nan": (_nan_voxel, "NaN or inf"),
    "unreadable": (_garbage, "cannot read NIfTI"),
    "missing modality": (_no_t1ce, "missing modality t1ce"),
}


@pytest.mark.parametrize("kind", NIFTI_BREAKS)
def test_brats_bad_input(tmp_path: Path, kind: str) -> None:
    folder = fx.write_brats2020(tmp_path, ids=(1,))[0]
    breaker, problem = NIFTI_BREAKS[kind]
    name = breaker(folder).name
    where = folder.name if kind == "missing modality" else name
    with pytest.raises(DataError, match=f"{re.escape(where)}.*{problem}"):
        [ref.load() for ref in list_cases(tmp_path)]
    assert name in str(pytest.raises(DataError, read_any, folder).value)


def test_msd_bad_input(tmp_path: Path) -> None:
    image, _ = fx.write_msd(tmp_path, ids=(1, 2), test_ids=())
    label = tmp_path / "labelsTr" / "BRATS_002.nii.gz"
    _save_like(label, np.zeros((24, 24, 5), np.uint8))
    _save_like(image, np.ones((24, 24, 8), np.float32))  # 3D instead of 4D
    first, second = list_cases(tmp_path)
    with pytest.raises(DataError, match=r"imagesTr/BRATS_001.nii.gz: expected a 4D image"):
        first.load()
    with pytest.raises(DataError, match=r"labelsTr/BRATS_002.nii.gz: shape \(24, 24, 5\)"):
        second.load()


# --------------------------------------------------------------------------------- labels


def test_label_helpers() -> None:
    seg = np.array([0, 1, 2, 3, 4])
    canonical = to_canonical(seg, "brats2024")
    assert canonical.tolist() == [0, 1, 2, 3, 0]
    assert from_canonical(canonical, "brats2024").tolist() == [0, 1, 2, 3, 0]
    mask = np.zeros((2, 3), np.uint8)
    mask[0, 2] = mask[1, 0] = 1
    assert from_one_hot(mask).tolist() == [3, 1]


# ------------------------------------------------------------------------------- channels


def test_channels_command(sets: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert channels.main(["--input", str(sets["kaggle"]), "--cases", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 kaggle-h5 cases" in out
    assert re.search(r"channel\s+configured\s+brain\s+NCR\s+ED\s+ET", out)
    verdicts = [line for line in out.splitlines() if "verdict:" in line]
    assert verdicts[0].startswith("verdict:") and verdicts[0].endswith(
        "matches the configured order"
    )
    assert verdicts[1].startswith("mask verdict:") and verdicts[1].endswith(
        "matches the configured order"
    )

    args = ["--input", str(sets["kaggle"]), "--channel-order", "t2,t1ce,t1,flair"]
    assert channels.main(args) == 0
    assert "DIFFERS from the configured order" in capsys.readouterr().out

    assert channels.main(["--input", str(sets["kaggle"] / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing: no such directory" in err


@pytest.mark.parametrize("order", [("et", "ed", "ncr"), ("ed", "ncr", "et"), ("ncr", "et", "ed")])
def test_channels_catch_a_swapped_mask_order(
    tmp_path: Path, sets: dict[str, Path], order: tuple[str, ...], capsys: pytest.CaptureFixture
) -> None:
    """A copy whose one-hot mask channels are in another order: the check names that order,
    and reading with it gives the same labels as the standard copy."""
    fx.write_kaggle_h5(tmp_path, volumes=(1, 2), slices=12, mask_order=order)
    assert channels.main(["--input", str(tmp_path), "--cases", "2"]) == 0
    out = capsys.readouterr().out
    mask_line = next(line for line in out.splitlines() if line.startswith("mask verdict:"))
    shown = ",".join(order)
    assert f"look like {shown}: DIFFERS" in mask_line and f"data.mask_order=[{shown}]" in mask_line

    assert channels.main(["--input", str(tmp_path), "--cases", "2", "--mask-order", shown]) == 0
    out = capsys.readouterr().out
    assert "mask verdict: mask channels look like ncr,ed,et" not in out  # read as configured
    assert re.search(r"mask verdict: .*: matches the configured order", out)

    swapped = list_cases(tmp_path, mask_order=order)[0].load()
    standard = list_cases(sets["kaggle"])[0].load()
    assert np.array_equal(swapped.seg, standard.seg) and swapped.seg.max() == 3


def test_channels_from_data_folder(tmp_path: Path, sets: dict[str, Path]) -> None:
    """The command accepts the content/data folder itself."""
    shutil.copytree(sets["kaggle"], tmp_path / "k")
    data = tmp_path / "k" / "BraTS2020_training_data" / "content" / "data"
    assert channels.main(["--input", str(data), "--format", "kaggle-h5"]) == 0
