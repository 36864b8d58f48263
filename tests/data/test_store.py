"""Packed slice store: prepare (counts, crop, dtypes, resume, atomicity, bad input), splits,
the DataModule on raw sources and on stores, augmentation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from tests import fixtures as fx
from tumorseg.cli import prepare as prep_cli
from tumorseg.core.errors import DataError
from tumorseg.core.labels import REGIONS
from tumorseg.data import prepare as prep
from tumorseg.data import preprocess
from tumorseg.data.datamodule import BratsDataModule
from tumorseg.data.datasets import ForegroundSampler
from tumorseg.data.preprocess import zscore
from tumorseg.data.readers import list_cases
from tumorseg.data.splits import kfold_cases, split_cases
from tumorseg.data.store import is_complete, open_store, partial_path, verify_store
from tumorseg.data.transforms import Augment

BRATS_IDS = (1, 2, 3, 4, 5, 6)
# raw label values of each region, per source convention
RAW_REGIONS = {
    "brats2020": {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)},
    "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)},
}


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small raw data sets, one per format (read-only: copy before changing)."""
    base = tmp_path_factory.mktemp("raw")
    fx.write_brats2020(base / "brats", ids=BRATS_IDS)
    fx.write_kaggle_h5(base / "kaggle", volumes=(1, 2, 3), slices=10)
    fx.write_msd(base / "msd", ids=(1, 2), test_ids=())
    return {p.name: p for p in base.iterdir()}


def store_counts(store, case_id: str) -> dict[str, int]:
    r = open_store(store).case_range(case_id)
    labels = np.asarray(open_store(store).labels[r.start : r.stop])
    return {k: int(np.isin(labels, v).sum()) for k, v in REGIONS.items()}


def raw_counts(src: Path, fmt: str) -> dict[str, dict[str, int]]:
    """Region voxel counts per case, read from the raw files without the readers."""
    out = {}
    if fmt == "kaggle-h5":
        for ref in list_cases(src, fmt):
            mask = np.stack([h5py.File(p, "r")["mask"][()] for p in ref.paths]).astype(bool)
            ncr, ed, et = mask[..., 0], mask[..., 1], mask[..., 2]
            out[ref.case_id] = {
                "wt": int((ncr | ed | et).sum()),
                "tc": int((ncr | et).sum()),
                "et": int(et.sum()),
            }
        return out
    convention = "msd" if fmt == "msd" else "brats2020"
    for ref in list_cases(src, fmt):
        raw = np.asarray(nib.load(ref.paths[-1]).dataobj)
        out[ref.case_id] = {
            k: int(np.isin(raw, v).sum()) for k, v in RAW_REGIONS[convention].items()
        }
    return out


# ---------------------------------------------------------------- prepare


@pytest.mark.parametrize(
    ("name", "fmt"), [("brats", "brats"), ("kaggle", "kaggle-h5"), ("msd", "msd")]
)
def test_prepare_keeps_region_counts_and_normalises(sets, tmp_path, name, fmt):
    dst = tmp_path / "store"
    manifest = prep.prepare(sets[name], dst, dtype="float32", progress=False)
    assert manifest["format"] == fmt and is_complete(dst) and not partial_path(dst).exists()
    store = open_store(dst)
    assert verify_store(store)
    for cid, counts in raw_counts(sets[name], fmt).items():
        assert store_counts(dst, cid) == counts, cid
        entry = next(c for c in manifest["cases"] if c["id"] == cid)
        assert entry["label_counts"]["3"] == counts["et"]
        assert set(entry["stats"]) == {"flair", "t1", "t1ce", "t2"}
        assert entry["stats"]["t1"]["p1"] <= entry["stats"]["t1"]["mean"]
    # images: the z-scored volume, axial slices in z order
    ref = list_cases(sets[name], fmt)[0]
    case = ref.load()
    r = store.case_range(ref.case_id)
    expected = zscore(case.image).transpose(3, 0, 1, 2)
    assert np.array_equal(store.images[r.start : r.stop], expected)
    assert store.images.dtype == np.float32 and store.labels.dtype == np.uint8
    assert manifest["total_slices"] == len(store) == sum(c["count"] for c in manifest["cases"])


def test_float16_and_float32(sets, tmp_path):
    half = prep.prepare(sets["brats"], tmp_path / "f16", progress=False)
    full = prep.prepare(sets["brats"], tmp_path / "f32", dtype="float32", progress=False)
    a, b = open_store(tmp_path / "f16"), open_store(tmp_path / "f32")
    assert half["dtype"] == "float16" and a.images.dtype == np.float16
    assert b.images.dtype == np.float32 and a.images.shape == b.images.shape
    assert np.allclose(a.images, b.images, atol=1e-2, rtol=1e-3)
    assert np.array_equal(a.labels, b.labels) and half["hash"] != full["hash"]
    assert (tmp_path / "f16" / "images.npy").stat().st_size < (
        tmp_path / "f32" / "images.npy"
    ).stat().st_size


def test_crop_never_cuts_tumour(sets, tmp_path):
    manifest = prep.prepare(sets["brats"], tmp_path / "crop", crop=14, progress=False)
    store = open_store(tmp_path / "crop")
    assert store.shape == (14, 14) and manifest["crop"] == 14
    for cid, counts in raw_counts(sets["brats"], "brats").items():
        assert store_counts(tmp_path / "crop", cid) == counts
    # a window bigger than the slice pads with background
    prep.prepare(sets["brats"], tmp_path / "pad", crop=32, progress=False)
    assert open_store(tmp_path / "pad").shape == (32, 32)
    # the stored affine maps the cropped voxel (0, 0, k) onto the source voxel (x0, y0, k)
    source = {ref.case_id: ref.load().affine for ref in list_cases(sets["brats"], "brats")}
    padded = json.loads((tmp_path / "pad" / "manifest.json").read_text())
    for entry in manifest["cases"] + padded["cases"]:
        x0, y0 = entry["crop_origin"]
        moved = source[entry["id"]] @ np.array([x0, y0, 3, 1.0])
        assert np.allclose(np.array(entry["affine"]) @ np.array([0, 0, 3, 1.0]), moved)
    # the tumour (about 10 voxels across) does not fit in 6: an error naming the case
    with pytest.raises(DataError, match=r"BraTS20_Training_001: tumour spans \d+ voxels"):
        prep.prepare(sets["brats"], tmp_path / "small", crop=6, progress=False)
    assert not (tmp_path / "small").exists()


def test_crop_window_unit():
    brain = np.zeros((20, 20, 3), bool)
    brain[2:12, 4:18] = True
    tumour = np.zeros_like(brain)
    tumour[2:5, 14:18] = True
    x0, y0 = preprocess.crop_origin(brain, tumour, 8, "c")
    assert x0 <= 2 and x0 + 8 >= 5 and y0 <= 14 and y0 + 8 >= 18
    assert 0 <= x0 <= 12 and 0 <= y0 <= 12


def test_resume_after_interruption(sets, tmp_path, monkeypatch):
    src, dst = sets["brats"], tmp_path / "store"
    uninterrupted = prep.prepare(src, tmp_path / "full", progress=False)
    real = prep.process_case
    first: list[str] = []

    def killed_after_two(ref, *args):
        if len(first) == 2:
            raise KeyboardInterrupt
        first.append(ref.case_id)
        return real(ref, *args)

    monkeypatch.setattr(prep, "process_case", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(src, dst, progress=False)
    assert not dst.exists() and partial_path(dst).is_dir()

    second: list[str] = []
    monkeypatch.setattr(
        prep, "process_case", lambda ref, *a: second.append(ref.case_id) or real(ref, *a)
    )
    manifest = prep.prepare(src, dst, progress=False)
    all_ids = {f"BraTS20_Training_{i:03d}" for i in BRATS_IDS}
    assert len(first) == 2 and set(second) == all_ids - set(first)
    assert manifest["hash"] == uninterrupted["hash"]
    assert is_complete(dst) and not partial_path(dst).exists()
    # a partial started with other options is started over
    monkeypatch.setattr(prep, "process_case", killed_after_two)
    first.clear()
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(src, tmp_path / "other", dtype="float32", progress=False)
    monkeypatch.setattr(prep, "process_case", real)
    redone = prep.prepare(src, tmp_path / "other", progress=False)
    assert redone["hash"] == uninterrupted["hash"]


def test_parallel_workers_give_the_same_store(sets, tmp_path):
    one = prep.prepare(sets["kaggle"], tmp_path / "one", progress=False)
    two = prep.prepare(sets["kaggle"], tmp_path / "two", workers=2, progress=False)
    assert one["hash"] == two["hash"] and one["cases"] == two["cases"]


def broken_copy(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the BraTS set whose case 2 has a truncated T1 file."""
    root = tmp_path / "broken"
    shutil.copytree(src, root)
    t1 = root / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:100])
    return root, t1


def test_bad_input_is_one_line_and_leaves_no_store(sets, tmp_path, capsys):
    root, t1 = broken_copy(sets["brats"], tmp_path)
    dst = tmp_path / "store"
    assert prep_cli.main(["--input", str(root), "--output", str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tumorseg-prepare: error: {t1}: cannot read NIfTI")
    assert not dst.exists()
    # Kaggle: a slice file cut short
    kaggle = tmp_path / "kaggle"
    shutil.copytree(sets["kaggle"], kaggle)
    bad = next(kaggle.rglob("volume_2_slice_3.h5"))
    bad.write_bytes(bad.read_bytes()[:500])
    assert prep_cli.main(["--input", str(kaggle), "--output", str(tmp_path / "k"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tumorseg-prepare: error: {bad}: ")
    assert not (tmp_path / "k").exists()
    # an empty folder
    (tmp_path / "empty").mkdir()
    assert prep_cli.main(["--input", str(tmp_path / "empty"), "--output", str(dst)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"tumorseg-prepare: error: {tmp_path / 'empty'}: empty directory"
    )


def test_skip_bad_lists_the_skipped_cases(sets, tmp_path, capsys):
    root, t1 = broken_copy(sets["brats"], tmp_path)
    dst = tmp_path / "store"
    assert prep_cli.main(["--input", str(root), "--output", str(dst), "--skip-bad", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"skipped BraTS20_Training_002: {t1}: cannot read NIfTI" in out
    manifest = json.loads((dst / "manifest.json").read_text())
    assert [s["id"] for s in manifest["skipped"]] == ["BraTS20_Training_002"]
    assert "cannot read NIfTI" in manifest["skipped"][0]["reason"]
    assert "BraTS20_Training_002" not in open_store(dst).case_ids
    assert len(manifest["cases"]) == len(BRATS_IDS) - 1


def test_cli_complete_store_and_force(sets, tmp_path, capsys):
    dst = tmp_path / "store"
    args = ["--input", str(sets["msd"]), "--output", str(dst), "--quiet"]
    assert prep_cli.main([*args, "--dtype", "float32", "--crop", "20"]) == 0
    assert "2 cases" in capsys.readouterr().out
    stamp = (dst / "images.npy").stat().st_mtime_ns
    assert prep_cli.main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (dst / "images.npy").stat().st_mtime_ns == stamp
    assert prep_cli.main([*args, "--force"]) == 0
    assert open_store(dst).images.dtype == np.float16
    assert prep_cli.main([*args, "--crop", "0"]) == 2
    assert "crop must be a positive" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    assert prep_cli.main(["--input", str(sets["msd"]), "--output", str(tmp_path / "junk")]) == 2
    assert "is not a slice store" in capsys.readouterr().err


# ---------------------------------------------------------------- splits


def test_kfold_splits_partition_the_non_test_cases():
    ids = [f"case_{i:02d}" for i in range(23)]
    plain = split_cases(ids, 0.15, 0.15, seed=4)
    folds = kfold_cases(ids, 0.15, seed=4, folds=5)
    assert folds["test"] == plain["test"]
    rest = set(ids) - set(folds["test"])
    members = [c for fold in folds["folds"] for c in fold]
    assert sorted(members) == sorted(rest) and len(members) == len(set(members))
    assert max(map(len, folds["folds"])) - min(map(len, folds["folds"])) <= 1
    for k in range(5):
        split = split_cases(ids, 0.15, 0.15, seed=4, fold=k, folds=5)
        assert split["val"] == sorted(folds["folds"][k]) and split["test"] == plain["test"]
        assert set(split["train"]) == rest - set(split["val"])
    with pytest.raises(DataError, match="fold must be"):
        split_cases(ids, 0.15, 0.15, 0, fold=5, folds=5)
    with pytest.raises(DataError, match="too few"):
        split_cases(ids[:4], 0.15, 0.25, 0, fold=0, folds=5)


# ---------------------------------------------------------------- the DataModule


def module(root: Path, tmp_path: Path, **kwargs) -> BratsDataModule:
    options = dict(
        source="brats",
        cache_root=str(tmp_path / "cache"),
        image_size=16,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.2,
        augment=False,
    )
    return BratsDataModule(str(root), **{**options, **kwargs})


def test_datamodule_from_raw_source_and_from_store(sets, tmp_path):
    dm = module(sets["brats"], tmp_path)
    dm.prepare_data()
    store = dm.store_path()
    assert store.parent == tmp_path / "cache" and store.name.startswith("brats-")
    assert is_complete(store)
    fx.split_by_patient(dm)
    image, labels = next(iter(dm.train_dataloader()))
    assert image.shape == (4, 4, 16, 16) and image.dtype == torch.float32
    assert labels.shape == (4, 16, 16) and labels.dtype == torch.uint8
    splits = json.loads((store / "splits.json").read_text())
    assert splits["seed=0,test=0.2,val=0.2"]["test"] == dm.split()["test"]

    from_store = module(store, tmp_path / "other")
    from_store.prepare_data()
    assert from_store.store_path() == store and not (tmp_path / "other").exists()
    assert from_store.manifest()["hash"] == dm.manifest()["hash"]
    assert from_store.manifest()["split"] == dm.split()

    # whole test cases at store size, every slice
    opened = open_store(store)
    tested = dm.test_cases()
    assert [c for c, _, _ in tested] == dm.split()["test"]
    for cid, image, labels in tested:
        r = opened.case_range(cid)
        assert image.shape == (len(r), 4, 24, 24) and image.dtype == np.float32
        assert np.array_equal(labels, opened.labels[r.start : r.stop])
        assert np.array_equal(image, opened.images[r.start : r.stop].astype(np.float32))

    preview, truth, index = dm.preview(2)
    assert preview.shape[1:] == (4, 16, 16) and len(index) == len(dm.split()["val"][:2])
    assert all((t > 0).any() for t in truth)


def test_datamodule_kfold_and_new_cases(sets, tmp_path):
    root = tmp_path / "brats"
    shutil.copytree(sets["brats"], root)
    folds = []
    for k in range(3):
        dm = module(root, tmp_path, fold=k, folds=3, test_fraction=0.2)
        dm.prepare_data()
        folds.append(dm.split())
    assert len({tuple(f["test"]) for f in folds}) == 1
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(set(folds[0]["train"]) | set(folds[0]["val"]))
    assert (
        len(
            {
                m
                for m in (
                    module(root, tmp_path, fold=k, folds=3).manifest()["hash"] for k in range(3)
                )
            }
        )
        == 3
    )
    # a new case in the raw source: the cached store is prepared again
    fx.write_brats2020(root, ids=(7,), rng=7)
    dm = module(root, tmp_path)
    dm.prepare_data()
    assert len(dm.manifest()["cases"]) == len(BRATS_IDS) + 1


def test_skip_empty_and_foreground_sampling(sets, tmp_path):
    # the fixture tumours reach every slice: clear the labels of slices 0-2 of every case
    root = tmp_path / "brats"
    shutil.copytree(sets["brats"], root)
    for seg in root.glob("*/*_seg.nii.gz"):
        img = nib.load(seg)
        data = np.asarray(img.dataobj).copy()
        data[:, :, :3] = 0
        nib.save(nib.Nifti1Image(data, img.affine), seg)
    dm = module(root, tmp_path, skip_empty="none", test_fraction=0)
    dm.prepare_data()
    dm.setup("fit")
    everything = len(dm.datasets["train"])
    assert everything == len(dm.split()["train"]) * 8
    only_tumour = module(root, tmp_path, skip_empty="tumour", test_fraction=0)
    only_tumour.setup("fit")
    tumour = only_tumour.store.slices["tumour"][only_tumour.datasets["train"].rows]
    assert (tumour > 0).all() and len(tumour) == everything - 3 * len(dm.split()["train"])
    assert len(only_tumour.index["val"]) == len(dm.split()["val"]) * 8  # val keeps every slice

    fg = np.array([True, False, False, False, False, False, False, False])
    torch.manual_seed(0)
    picks = list(ForegroundSampler(fg, 0.5))
    assert len(picks) == 8 and picks.count(0) == 4
    assert list(ForegroundSampler(fg, 0.0)).count(0) == 0
    sampled = module(root, tmp_path, foreground_ratio=1.0, test_fraction=0)
    sampled.setup("fit")
    for _, labels in sampled.train_dataloader():
        assert all((lab > 0).any() for lab in labels)


def test_bad_options_and_missing_store(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        BratsDataModule(str(tmp_path / "missing"), source="brats").prepare_data()
    with pytest.raises(DataError, match="skip_empty"):
        BratsDataModule(str(tmp_path), skip_empty="sometimes")
    with pytest.raises(DataError, match="no slice store"):
        BratsDataModule(str(tmp_path), source="brats", cache_dir=str(tmp_path / "s")).setup("fit")


# ---------------------------------------------------------------- augmentation


def test_augment_keeps_shapes_labels_and_background():
    torch.manual_seed(0)
    image = torch.zeros(6, 4, 32, 32)
    image[:, :, 8:24, 8:24] = torch.randn(6, 4, 16, 16)
    labels = torch.zeros(6, 32, 32, dtype=torch.uint8)
    labels[:, 12:20, 12:20] = torch.randint(1, 4, (6, 8, 8), dtype=torch.uint8)
    out, lab = Augment(flip_x=0.5, p_spatial=1.0, p_intensity=1.0, p_gamma=1.0)(image, labels)
    assert out.shape == image.shape and lab.shape == labels.shape and lab.dtype == torch.uint8
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3} and torch.isfinite(out).all()
    assert ((out != 0).any(1) | (lab == 0)).all()  # tumour stays inside the moved brain
    flipped, flab = Augment(flip_x=0.0, flip_y=1.0)(image, labels)
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(flab, labels.flip(-1))
    same, slab = Augment(flip_x=0.0)(image, labels)
    assert torch.equal(same, image) and torch.equal(slab, labels)
    shifted = Augment(flip_y=0.0, p_intensity=1.0)(image, labels)[0]
    assert (shifted[image == 0] == 0).all()  # background stays 0


def test_augment_on_device_runs_after_transfer(sets, tmp_path):
    from types import SimpleNamespace

    dm = module(
        sets["brats"], tmp_path, augment={"flip_x": 0.0, "flip_y": 1.0}, augment_on_device=True
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.datasets["train"].transform is None
    batch = dm.datasets["train"].__getitems__([0, 1])
    dm.trainer = SimpleNamespace(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)
    image, labels = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(image, batch[0].flip(-1)) and torch.equal(labels, batch[1].flip(-1))


def test_interrupted_before_the_rename(sets, tmp_path, monkeypatch):
    src, dst = sets["msd"], tmp_path / "store"
    real = prep._publish

    def crash(partial, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(src, dst, progress=False)
    assert not dst.exists() and is_complete(partial_path(dst))  # .partial is not DST
    monkeypatch.setattr(prep, "_publish", real)
    monkeypatch.setattr(prep, "process_case", lambda *a: pytest.fail("redid a case"))
    manifest = prep.prepare(src, dst, progress=False)
    assert is_complete(dst) and verify_store(open_store(dst)) and manifest["hash"]


def test_bench_data_tiny_run(tmp_path, capsys):
    from tumorseg.bench import data as bench

    out = tmp_path / "bench.md"
    args = ["--volumes", "3", "--slices", "6", "--size", "24", "--workers", "0"]
    args += ["--max-slices", "32", "--batch-size", "2", "--cold", "fadvise", "--output", str(out)]
    assert bench.main(args) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out and "fadvise" in text and "per 1,000 slices" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")][1:]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("h5", "cold"),
        ("h5", "warm"),
        ("store", "cold"),
        ("store", "warm"),
    ]
    assert all(float(r[5].replace(",", "")) > 0 for r in rows)
    assert bench.main(["--workers", "x"]) == 2
