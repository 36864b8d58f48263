"""Tests of the synthetic BraTS demo data set."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from tumorseg.cli import demo as demo_cli
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
    # no temporary folders left; the hidden marker records seed and difficulty
    assert sorted(p.name for p in root.iterdir()) == [demo.MARKER, *ids]
    marker = json.loads((root / demo.MARKER).read_text())
    assert marker["seed"] == 0 and marker["difficulty"] == "brats"
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


def test_easy_contrasts() -> None:
    images, seg = demo.make_case(1, seed=0, difficulty="easy")
    edema, enhancing = seg == 2, seg == 4
    brain = (images["flair"] > 0) & (seg == 0)
    # Edema is bright on FLAIR and T2, enhancing tumour is bright on T1ce.
    for name in ("flair", "t2"):
        assert images[name][edema].mean() > 1.2 * images[name][brain].mean()
    assert images["t1ce"][enhancing].mean() > 1.5 * images["t1ce"][brain].mean()


@pytest.mark.parametrize("difficulty", demo.DIFFICULTIES)
def test_deterministic(difficulty: str) -> None:
    images, seg = demo.make_case(1, seed=0, difficulty=difficulty)
    again, seg_again = demo.make_case(1, seed=0, difficulty=difficulty)
    other, seg_other = demo.make_case(1, seed=1, difficulty=difficulty)
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
    assert demo_cli.main(["--output", str(tmp_path), "--cases", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["tumorseg-demo: error: --cases must be at least 1, got 0"]
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert demo_cli.main(["--output", str(afile), "--cases", "1"]) == 2
    assert str(afile) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # nothing written


def edema_hidden_in_brain(images: dict[str, np.ndarray], seg: np.ndarray) -> float:
    """Share of edema voxels darker on FLAIR than the brightest 10 % of non-tumour brain."""
    flair = images["flair"]
    brain = (flair > 0) & (seg == 0)
    return float((flair[seg == 2] < np.percentile(flair[brain], 90)).mean())


def test_realistic_cases_are_hard() -> None:
    """The default demo: edema overlapping normal brain on FLAIR, enhancing look-alikes
    outside the tumour on T1ce, lower-grade cases with little or no enhancing tumour and a
    non-enhancing core that shows the T2-FLAIR mismatch (brighter than edema on T2, no brighter
    on FLAIR) and is dark on T1."""
    assert edema_hidden_in_brain(*demo.make_case(1, seed=0, difficulty="easy")) < 0.1
    grades = []
    for index in (1, 7):
        images, seg = demo.make_case(index, seed=0)
        assert edema_hidden_in_brain(images, seg) > 0.3
        # T1ce voxels as bright as the brightest non-tumour brain exist well away from tumour
        brain = (images["t1ce"] > 0) & (seg == 0)
        far = brain & ~ndi.binary_dilation(seg > 0, iterations=5)
        bright = np.percentile(images["t1ce"][seg == 4], 50) if (seg == 4).any() else 0
        assert ((images["t1ce"] >= bright) & far).sum() > 100
        tc, et = np.isin(seg, (1, 4)).sum(), (seg == 4).sum()
        grades.append(et / tc)
    assert grades[0] > 0.3 and grades[1] < 0.15  # case 7 is lower grade: a small ET focus
    median = {k: {c: np.median(v[seg == c]) for c in (1, 2)} for k, v in images.items()}
    assert median["t2"][1] > 1.3 * median["t2"][2] and median["flair"][1] <= median["flair"][2]
    assert median["t1"][1] < 0.8 * median["t1"][2]


def test_grades_and_satellites() -> None:
    """Lower-grade tumours have at most a small enhancing focus, high-grade ones an enhancing
    rim; satellites add small tumour components near the main one."""
    anatomy = demo._anatomy()
    components = []
    for seed in range(4):
        for low in (False, True):
            rng = np.random.default_rng([seed, 99])
            _, labels, _ = demo._tumours_brats(rng, anatomy, low_grade=low)
            tc, et = np.isin(labels, (1, 4)).sum(), (labels == 4).sum()
            assert et < 0.15 * tc if low else et > 0.2 * tc
            components.append(ndi.label(labels > 0)[1])
    assert max(components) >= 2


def test_difficulty_marker_refuses_to_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    demo.write_demo(tmp_path, cases=1, seed=0, progress=False, difficulty="easy")
    with pytest.raises(demo.DemoError, match="difficulty easy"):
        demo.write_demo(tmp_path, cases=1, seed=0, progress=False)
    assert demo_cli.main(["--output", str(tmp_path), "--cases", "1", "--seed", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "seed 0" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.MARKER, "BraTS20_Training_001"]


def test_two_workers_write_the_same_cases_as_one(tmp_path) -> None:
    """Cases written side by side by two processes are the files one process writes."""
    one = demo.write_demo(tmp_path / "one", cases=3, seed=5, progress=False, difficulty="easy")
    two = demo.write_demo(
        tmp_path / "two", cases=3, seed=5, progress=False, difficulty="easy", workers=2
    )
    assert [p.name for p in two] == [p.name for p in one]
    for a, b in zip(one, two, strict=True):
        for name in (*demo.MODALITIES, "seg"):
            x = nib.load(a / f"{a.name}_{name}.nii.gz")
            y = nib.load(b / f"{b.name}_{name}.nii.gz")
            np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
            assert np.array_equal(x.affine, y.affine)
