"""``tumorseg-prepare`` on bad input, one test per kind of problem the README lists: one line
``tumorseg-prepare: error: <file>: <problem>`` naming the bad file (or folder), exit 2, and no
store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from tests import fixtures as fx
from tumorseg.cli import prepare as prep_cli

SRC = Path(__file__).resolve().parents[2] / "src"  # this checkout's package, not another one


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good raw sets (read-only: each test breaks a copy)."""
    base = tmp_path_factory.mktemp("good")
    fx.write_brats2020(base / "brats", ids=(1, 2))
    fx.write_kaggle_h5(base / "kaggle", volumes=(1, 2), slices=4)
    return base


def _rewrite_h5(path: Path, **datasets: np.ndarray) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)


def _h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["image"][()], f["mask"][()]


def _resave(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None):
    img = nib.load(path)
    data = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine, img.header), path)


# Each breaker gets a copy of the source and returns (bad file or folder, message part).


def truncated_h5(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_2_slice_1.h5"))
    bad.write_bytes(bad.read_bytes()[:500])
    return bad, "cannot read HDF5"


def not_hdf5(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_1_slice_2.h5"))
    bad.write_text("volume 1, slice 2\n")
    return bad, "cannot read HDF5"


def missing_image(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_1_slice_0.h5"))
    _rewrite_h5(bad, mask=_h5(bad)[1])
    return bad, "no dataset 'image'"


def missing_mask(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_2_slice_3.h5"))
    _rewrite_h5(bad, image=_h5(bad)[0])
    return bad, "no dataset 'mask'"


def wrong_shape(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_1_slice_1.h5"))
    image, mask = _h5(bad)
    _rewrite_h5(bad, image=image[..., :3], mask=mask)
    return bad, "image has shape (24, 24, 3)"


def wrong_dtype(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_1_slice_1.h5"))
    image, mask = _h5(bad)
    _rewrite_h5(bad, image=image, mask=mask.astype(np.float32))
    return bad, "float32, expected (H, W, 3) integer"


def nan_in_image(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_2_slice_2.h5"))
    image, mask = _h5(bad)
    image[3, 4, 1] = np.nan
    _rewrite_h5(bad, image=image, mask=mask)
    return bad, "NaN or inf"


def mask_not_one_hot(root: Path) -> tuple[Path, str]:
    bad = next(root.rglob("volume_1_slice_3.h5"))
    image, mask = _h5(bad)
    mask[5, 5] = (1, 1, 0)  # necrosis and edema at once
    _rewrite_h5(bad, image=image, mask=mask)
    return bad, "not one-hot"


def unknown_label(root: Path) -> tuple[Path, str]:
    bad = root / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    seg = np.asarray(nib.load(bad).dataobj).copy()
    seg[2, 3, 4] = 3  # BraTS 2020 labels are 0, 1, 2, 4
    _resave(bad, seg)
    return bad, "unexpected label value 3 for brats2020 (allowed [0, 1, 2, 4]"


def missing_modality(root: Path) -> tuple[Path, str]:
    folder = root / "BraTS20_Training_001"
    (folder / "BraTS20_Training_001_t1ce.nii.gz").unlink()
    return folder, "missing modality t1ce"


def different_shapes(root: Path) -> tuple[Path, str]:
    bad = root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    _resave(bad, np.asarray(nib.load(bad).dataobj)[:, :, :6])
    return bad, "differs from"


def different_affines(root: Path) -> tuple[Path, str]:
    bad = root / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz"
    ref = root / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz"
    affine = nib.load(bad).affine.copy()
    affine[0, 3] += 2.0  # shifted by 2 mm
    _resave(bad, affine=affine)
    return ref, "differs from"  # the first file that disagrees with its predecessor


def empty_folder(root: Path) -> tuple[Path, str]:
    shutil.rmtree(root)
    root.mkdir()
    return root, "empty directory"


def unrecognised_folder(root: Path) -> tuple[Path, str]:
    shutil.rmtree(root)
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "readme.txt").write_text("scans to follow\n")
    return root, "not a recognised BraTS layout"


KINDS: dict[str, tuple[str, Callable[[Path], tuple[Path, str]]]] = {
    "truncated .h5": ("kaggle", truncated_h5),
    "non-HDF5 .h5": ("kaggle", not_hdf5),
    "missing image": ("kaggle", missing_image),
    "missing mask": ("kaggle", missing_mask),
    "wrong shape": ("kaggle", wrong_shape),
    "wrong dtype": ("kaggle", wrong_dtype),
    "NaN/inf": ("kaggle", nan_in_image),
    "mask not one-hot": ("kaggle", mask_not_one_hot),
    "unknown label value": ("brats", unknown_label),
    "missing modality": ("brats", missing_modality),
    "modalities of different shapes": ("brats", different_shapes),
    "modalities of different affines": ("brats", different_affines),
    "empty folder": ("brats", empty_folder),
    "unrecognised folder": ("brats", unrecognised_folder),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_is_one_line_exit_2_no_store(kind, sources, tmp_path, capsys):
    name, breaker = KINDS[kind]
    root = tmp_path / name
    shutil.copytree(sources / name, root)
    bad, problem = breaker(root)
    dst = tmp_path / "store"
    assert prep_cli.main(["--input", str(root), "--output", str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    prefix = f"tumorseg-prepare: error: {bad}: "
    assert err[0].startswith(prefix), err[0]
    assert problem in err[0][len(prefix) :], err[0]  # in the problem, not in the path
    assert "Traceback" not in err[0]
    assert not dst.exists()


def prepare_command() -> list[str]:
    """The installed ``tumorseg-prepare`` console script (beside this interpreter, else on
    PATH); ``python -m tumorseg.cli.prepare`` only where it is not installed."""
    script = shutil.which("tumorseg-prepare", path=str(Path(sys.executable).parent))
    script = script or shutil.which("tumorseg-prepare")
    return [script] if script else [sys.executable, "-m", "tumorseg.cli.prepare"]


@pytest.mark.parametrize(
    ("kind", "bad_case"),
    [("unknown label value", "BraTS20_Training_002"), ("truncated .h5", "volume_002")],
)
def test_console_script_with_two_workers_on_bad_input(kind, bad_case, sources, tmp_path):
    """As a user runs it: the console script in a process of its own, cases converted by two
    worker processes; the worker's error still comes back as one line, exit 2, no store, and
    in ``store.partial`` (kept for a rerun) only whole cases, none of the bad one."""
    name, breaker = KINDS[kind]
    root = tmp_path / name
    shutil.copytree(sources / name, root)
    bad, problem = breaker(root)
    dst = tmp_path / "store"
    argv = ["--input", str(root), "--output", str(dst), "--workers", "2", "--quiet"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [*prepare_command(), *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    prefix = f"tumorseg-prepare: error: {bad}: "
    assert err[0].startswith(prefix) and problem in err[0][len(prefix) :], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "store.partial"])
    files = sorted(p.name for p in (tmp_path / "store.partial" / "cases").iterdir())
    done = {f.split(".")[0] for f in files}
    assert bad_case not in done, files
    whole = [f"{c}.{part}" for c in sorted(done) for part in CASE_FILES]
    assert files == whole  # nothing half-written


CASE_FILES = ("images.npy", "json", "labels.npy", "slices.npy")
