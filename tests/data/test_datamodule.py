import shutil

import nibabel as nib
import numpy as np
import pytest

from tests import fixtures as fx
from tumorseg.core.errors import DataError
from tumorseg.data.datamodule import BratsDataModule
from tumorseg.data.preprocess import zscore
from tumorseg.data.readers import read_any
from tumorseg.data.splits import split_cases
from tumorseg.data.store import is_complete


def test_split_is_by_patient_and_seeded():
    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, 21)]
    split = split_cases(ids, val=0.15, test=0.15, seed=0)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 20 and set.union(*parts) == set(ids)
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    assert split == split_cases(list(reversed(ids)), 0.15, 0.15, seed=0)
    assert split != split_cases(ids, 0.15, 0.15, seed=1)
    with pytest.raises(DataError, match="too few"):
        split_cases(ids[:2], 0.15, 0.15, 0)


def test_datamodule_serves_slices_of_disjoint_cases(demo_root):
    dm = BratsDataModule(
        str(demo_root),
        demo_cases=4,
        image_size=64,
        batch_size=4,
        val_fraction=0.25,
        test_fraction=0.25,
        min_brain_fraction=0.3,
    )
    dm.prepare_data()  # demo -> slice store in the cache beside it
    assert is_complete(dm.store_path()) and dm.store_path().parent == demo_root.parent / "cache"
    cases = fx.split_by_patient(dm)
    image, labels = next(iter(dm.train_dataloader()))
    assert image.shape == (4, 4, 64, 64) and labels.shape == (4, 64, 64)
    store = dm.store
    train_labels = store.labels[dm.datasets["train"].rows]
    assert set(np.unique(train_labels)) <= {0, 1, 2, 3}
    assert (np.asarray(store.labels) == 3).any()  # 4 -> 3 (canonical ET; any split)
    brain = store.slices["brain"][dm.datasets["train"].rows]
    assert (brain >= 0.3 * 240 * 240).all()  # min_brain_fraction applies
    same = BratsDataModule(str(demo_root), demo_cases=4, val_fraction=0.25, test_fraction=0.25)
    assert len(dm.manifest()["cases"]) == 4
    other = BratsDataModule(
        str(demo_root), demo_cases=4, val_fraction=0.25, test_fraction=0.25, split_seed=3
    )
    assert dm.manifest()["hash"] == same.manifest()["hash"]
    assert dm.manifest()["split"] != other.manifest()["split"]
    assert dm.manifest()["hash"] != other.manifest()["hash"]  # the split is part of the identity
    image, labels, index = dm.preview(2)
    assert len(index) == 1 and (labels > 0).any()  # one val case -> one slice, with tumour
    ((cid, volume, seg),) = dm.test_cases()
    assert volume.shape == (155, 4, 240, 240) and seg.shape == (155, 240, 240)
    assert cid in cases["test"] and (seg == 3).any()


def test_zscore_over_brain_only():
    image = np.zeros((4, 4, 4, 2), np.float32)
    image[:, :2] = np.arange(16, dtype=np.float32).reshape(2, 4, 2)
    out = zscore(image)
    brain = (image != 0).any(0)
    assert np.allclose(out[:, ~brain], 0)
    assert np.allclose(out[0][brain].mean(), 0, atol=1e-5) and np.allclose(
        out[0][brain].std(), 1, atol=1e-4
    )


def test_zscore_equals_the_masked_statistics_to_the_bit():
    """The bounding-box shortcut gives what indexing the whole volume by the mask gives,
    also for a brain that touches the volume's edge on one axis."""
    rng = np.random.default_rng(0)
    image = np.zeros((4, 30, 26, 20), np.float32)
    image[:, 3:27, 5:25, :] = rng.lognormal(5, 1, (4, 24, 20, 20)).astype(np.float32)
    image[:, 3, 5, 0] = 0  # a background voxel inside the box
    image[1, 26, 24, 19] = 7.0  # one modality only at the box's far corner
    brain = (image != 0).any(0)
    expected = np.zeros_like(image)
    for c in range(4):
        values = image[c][brain]
        expected[c][brain] = (values - values.mean()) / values.std()
    assert np.array_equal(zscore(image), expected)


def test_reader_errors_name_the_file(demo_root, tmp_path):
    case = tmp_path / "BraTS20_Training_001"
    shutil.copytree(demo_root / case.name, case)
    good = read_any(case)
    assert good.image.shape == (4, 240, 240, 155) and good.spacing == (1.0, 1.0, 1.0)
    # unknown label value
    seg = case / f"{case.name}_seg.nii.gz"
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, img.affine), seg)
    with pytest.raises(DataError, match=r"_seg.nii.gz: unexpected label value 3"):
        read_any(case)
    # truncated file
    t1 = case / f"{case.name}_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"_t1.nii.gz: cannot read NIfTI"):
        read_any(case)
    # missing modality
    t1.unlink()
    with pytest.raises(DataError, match="missing modality t1"):
        read_any(case)


def test_empty_or_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        BratsDataModule(str(tmp_path / "missing"), source="brats").prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty directory"):
        BratsDataModule(str(tmp_path / "empty"), source="brats").prepare_data()
