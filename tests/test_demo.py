"""Tests of the synthetic BraTS demo data set."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.data import demo

NAMES = ("flair", "t1", "t1ce", "t2", "seg")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("demo")
    return root, demo.write_demo(root, cases=2, seed=0, progress=False)


def test_layout(written: tuple[Path, list[Path]]) -> None:
    root, folders = written
    ids = ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert [f.name for f in folders] == ids
    assert sorted(p.name for p in root.iterdir()) == ids  # no temporary folders left
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{folder.name}_{name}.nii.gz" for name in NAMES
        )


def test_headers_and_dtypes(written: tuple[Path, list[Path]]) -> None:
    _, folders = written
    for name in NAMES:
        img = nib.load(folders[0] / f"{folders[0].name}_{name}.nii.gz")
        assert img.shape == (240, 240, 155)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(img.affine, demo.BRATS_AFFINE)
        expected = np.uint8 if name == "seg" else np.int16
        assert img.get_data_dtype() == expected
        assert np.asarray(img.dataobj).dtype == expected


def test_labels_and_anatomy(written: tuple[Path, list[Path]]) -> None:
    _, folders = written
    for folder in folders:
        seg = np.asarray(nib.load(folder / f"{folder.name}_seg.nii.gz").dataobj)
        flair = np.asarray(nib.load(folder / f"{folder.name}_flair.nii.gz").dataobj)
        labels = set(np.unique(seg).tolist())
        assert labels <= {0, 1, 2, 4}
        assert {2, 4} <= labels
        assert np.all(flair[seg > 0] > 0)  # tumour lies inside the brain
        assert flair.min() == 0  # background
        assert 0.1 < (flair > 0).mean() < 0.4  # a brain-sized head


def test_contrasts() -> None:
    images, seg = demo.make_case(1, seed=0)
    edema, enhancing = seg == 2, seg == 4
    brain = (images["flair"] > 0) & (seg == 0)
    # Edema is bright on FLAIR and T2, enhancing tumour is bright on T1ce.
    for name in ("flair", "t2"):
        assert images[name][edema].mean() > 1.2 * images[name][brain].mean()
    assert images["t1ce"][enhancing].mean() > 1.5 * images["t1ce"][brain].mean()


def test_deterministic() -> None:
    images, seg = demo.make_case(1, seed=0)
    again, seg_again = demo.make_case(1, seed=0)
    other, seg_other = demo.make_case(1, seed=1)
    np.testing.assert_array_equal(seg, seg_again)
    for name in demo.MODALITIES:
        np.testing.assert_array_equal(images[name], again[name])
    assert not np.array_equal(seg, seg_other)
    assert not np.array_equal(images["flair"], other["flair"])


def test_resumable(written: tuple[Path, list[Path]]) -> None:
    root, folders = written
    files = sorted(root.rglob("*.nii.gz"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert demo.write_demo(root, cases=2, seed=0, progress=False) == folders
    assert {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*.nii.gz"))} == before


def test_case_id() -> None:
    assert demo.case_id(7) == "BraTS20_Training_007"
    assert demo.case_id(123) == "BraTS20_Training_123"


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--output", str(tmp_path), "--cases", "0"]) == 2
    err = capsys.readouterr().err
    assert "0" in err and len(err.strip().splitlines()) == 1
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert demo.main(["--output", str(afile), "--cases", "1"]) == 2
    assert str(afile) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # nothing written
