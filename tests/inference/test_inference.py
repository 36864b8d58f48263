"""Inference replays training's preprocessing: crop, orientation, spacing, slice filter, resize.

One tiny net is trained with ``data.crop=160 data.image_size=128``; its checkpoint records the
preprocessing, and ``tumorseg-predict`` must reproduce the test stage voxel for voxel, give the
same world-space answer for a permuted and flipped copy of a case, and nearly the same answer
for the case resampled to 0.9 x 0.9 x 2 mm.
"""

from __future__ import annotations

import argparse
import pathlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from tests.conftest import compose_tiny
from tumorseg.cli.predict import main as predict_main
from tumorseg.data.case import MODALITIES, Case
from tumorseg.data.preprocess import NetInput, Preprocessing, net_shape
from tumorseg.data.readers import read_any
from tumorseg.data.transforms import Augment
from tumorseg.inference.predict import load_for_inference, predict_case
from tumorseg.train import run

pytestmark = pytest.mark.filterwarnings("ignore:vert. bool was deprecated")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict:
    """A tiny net trained on 160 x 160 crops resized to 128 x 128, with its test stage."""
    tmp = tmp_path_factory.mktemp("crop")
    cfg = compose_tiny(
        tmp,
        demo_root,
        [
            "data.crop=160",
            "data.image_size=128",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=6",
            "overlay_cases=0",
            # the better of the two epochs: the orientation and spacing tests need a net whose
            # tumour is compact enough to survive resampling
            "callbacks.model_checkpoint.monitor=val/dice_mean",
        ],
    )
    run(cfg)
    ckpt = next((tmp / "out" / "checkpoints").glob("epoch_*.ckpt"))
    found = tmp.glob("**/evaluation/predictions/*.nii.gz")
    preds = {p.name.removesuffix(".nii.gz"): p for p in found}
    return {"ckpt": ckpt, "predictions": preds, "root": tmp, "cfg": cfg}


@pytest.fixture(scope="module")
def module(trained: dict):
    return load_for_inference(trained["ckpt"], "cpu")


def predict_file(ckpt: Path, case_dir: Path, out: Path, *extra: str) -> np.ndarray:
    code = predict_main(
        ["--checkpoint", str(ckpt), "--input", str(case_dir), "--output", str(out), "--quiet"]
        + list(extra)
    )
    assert code == 0
    return np.asarray(nib.load(out).dataobj)


def write_case(folder: Path, case: Case) -> Path:
    """A BraTS 2020 case folder holding ``case``'s four modalities with its affine."""
    folder.mkdir(parents=True)
    for k, name in enumerate(MODALITIES):
        nib.save(
            nib.Nifti1Image(case.image[k], case.affine), folder / f"{folder.name}_{name}.nii.gz"
        )
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# ---------------------------------------------------------------- the checkpoint and the crop


def test_checkpoint_records_the_preprocessing(module):
    pre = module.preprocessing
    assert (pre.crop, pre.slice_shape, pre.image_size) == (160, (160, 160), 128)
    assert pre.orientation == "LPS" and pre.spacing == (1.0, 1.0)
    assert pre.skip_empty == "brain" and pre.min_brain_fraction == 0.3  # debug=tiny's filter


@pytest.mark.slow
def test_predict_on_raw_case_equals_test_stage_voxel_for_voxel(trained, demo_root, tmp_path):
    """tumorseg-predict's output file for a raw test case equals the test stage's logged
    prediction for that case voxel for voxel: the command line (reading the case, loading the
    checkpoint, writing the labels back on the case's grid) adds nothing to the prediction.

    Both call ``inference.predict_case``, so a preprocessing step wrong in it (the crop ignored,
    say) is wrong in both alike and passes here; test_predict_replays_the_training_crop guards
    the crop."""
    assert trained["predictions"], "the test stage logged no predictions"
    for case_id, logged in trained["predictions"].items():
        stage = np.asarray(nib.load(logged).dataobj)
        out = predict_file(
            trained["ckpt"],
            demo_root / case_id,
            tmp_path / f"{case_id}.nii.gz",
            "--labels",
            "brats2023",  # canonical 0/1/2/3, as the test stage saves them
        )
        assert stage.shape == out.shape == (240, 240, 155)
        assert np.count_nonzero(out) > 0
        assert np.array_equal(stage, out)


@pytest.mark.slow
def test_test_stage_logs_lesion_wise_results(trained):
    """The test stage's case table carries NSD and the lesion-wise columns, and the per-lesion
    table is logged beside it."""
    cases = pd.read_csv(next(trained["root"].glob("**/evaluation/test_cases.csv")))
    assert {"nsd", "lesions_ref", "missed", "lesion_dice", "lesion_hd95"} <= set(cases.columns)
    assert cases["lesions_ref"].gt(0).all()  # every demo test case has a tumour
    lesions = pd.read_csv(next(trained["root"].glob("**/evaluation/test_cases_lesions.csv")))
    assert set(lesions.case_id) == set(cases.case_id)
    assert set(lesions.status) <= {"matched", "missed", "false"}


@pytest.mark.slow
def test_predict_replays_the_training_crop(trained, module, demo_root, tmp_path):
    """An explicit replay of what training fed the net (the store's crop window, 160 -> 128,
    the store's kept slices), written out here step by step, equals tumorseg-predict voxel for
    voxel. Predicting the whole 240 x 240 slice resized to 128 (the crop ignored) fails this."""
    from hydra.utils import instantiate

    from tumorseg.data.preprocess import zscore
    from tumorseg.data.store import open_store
    from tumorseg.inference.predict import autocast_dtype

    store = open_store(instantiate(trained["cfg"].data).store_path())
    info = {c["id"]: c for c in store.manifest["cases"]}
    case_id = sorted(trained["predictions"])[0]
    x0, y0 = info[case_id]["crop_origin"]
    raw = read_any(demo_root / case_id, labelled=False)
    image = zscore(raw.image)[:, x0 : x0 + 160, y0 : y0 + 160]
    rows = store.case_range(case_id)
    brain = store.slices["brain"][rows.start : rows.stop]
    keep = np.flatnonzero(brain >= 0.3 * 160 * 160)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)[keep]))
    expected = np.zeros(raw.image.shape[1:], dtype=np.uint8)
    dtype = autocast_dtype(torch.device("cpu"))
    with torch.inference_mode():
        for start in range(0, len(keep), 32):
            batch = torch.nn.functional.interpolate(x[start : start + 32], (128, 128), mode="area")
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = module.net(batch.contiguous(memory_format=torch.channels_last))
            logits = torch.nn.functional.interpolate(
                logits.float(), (160, 160), mode="bilinear", align_corners=False
            )
            regions = torch.sigmoid(logits) > 0.5
            labels = torch.zeros(regions[:, 0].shape, dtype=torch.uint8)
            labels[regions[:, 0]], labels[regions[:, 1]], labels[regions[:, 2]] = 2, 1, 3
            z = keep[start : start + 32]
            expected[x0 : x0 + 160, y0 : y0 + 160, z] = labels.permute(1, 2, 0).numpy()
    out = predict_file(
        trained["ckpt"], demo_root / case_id, tmp_path / "seg.nii.gz", "--labels", "brats2023"
    )
    assert np.count_nonzero(expected) > 0
    assert np.array_equal(out, expected)


# ---------------------------------------------------------------- orientation and spacing


@pytest.fixture(scope="module")
def case(demo_root: Path) -> Case:
    return read_any(demo_root / "BraTS20_Training_001", labelled=False)


@pytest.fixture(scope="module")
def reference(module, case) -> np.ndarray:
    labels = predict_case(module, case)
    assert np.count_nonzero(labels) > 1000, "the tiny net should find tumour in this case"
    return labels


@pytest.mark.parametrize("axes", [(1, 0, 2), (2, 0, 1)])
def test_permuted_and_flipped_case_gives_the_same_world_prediction(module, case, reference, axes):
    """The same physical image stored with other voxel axes: the prediction, mapped back, must be
    identical. Without the reorientation (net run on the voxel axes as stored), this fails."""
    flip = 0
    image = np.flip(np.transpose(case.image, (0, *(a + 1 for a in axes))), axis=flip + 1)
    # voxel (i, j, k) of the new array is old voxel v with v[axes[n]] = new index n (flipped)
    shape = image.shape[1:]
    to_old = np.zeros((4, 4))
    for n, a in enumerate(axes):
        to_old[a, n] = 1.0
    to_old[3, 3] = 1.0
    unflip = np.eye(4)
    unflip[flip, flip], unflip[flip, 3] = -1.0, shape[flip] - 1
    affine = case.affine @ to_old @ unflip
    moved = Case("moved", np.ascontiguousarray(image), None, affine)

    labels = predict_case(module, moved)
    back = np.transpose(np.flip(labels, axis=flip), np.argsort(axes))
    assert back.shape == reference.shape
    assert np.array_equal(back, reference)


def resample(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """``volume`` onto a grid of ``shape`` covering the same extent (voxel centres aligned)."""
    coords = [
        (np.arange(n) + 0.5) * (old / n) - 0.5 for n, old in zip(shape, volume.shape, strict=True)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(volume, grid, order=order, mode="nearest")


@pytest.mark.slow
def test_anisotropic_case_matches_after_resampling_back(module, case, reference):
    """0.9 x 0.9 x 2 mm: inference resamples in-plane to the training 1 mm and maps back. Dice of
    the whole tumour against the 1 mm prediction, resampled back: >= 0.95. Without the in-plane
    resampling (net run on 0.9 mm pixels), this fails."""
    shape = (round(240 / 0.9), round(240 / 0.9), round(155 / 2))
    image = np.stack([resample(c, shape, 1) for c in case.image]).astype(np.float32)
    scale = np.diag([240 / shape[0], 240 / shape[1], 155 / shape[2], 1.0])
    affine = case.affine @ scale
    labels = predict_case(module, Case("aniso", image, None, affine))
    assert labels.shape == shape
    back = resample(labels, reference.shape, 0)
    assert dice(back > 0, reference > 0) >= 0.95


def test_non_square_slices_keep_their_aspect():
    """A 240 x 200 slice is padded, not squashed: the same factor 128/240 along x and y."""
    pre = Preprocessing(slice_shape=(240, 240), image_size=128)
    padded, net = net_shape((240, 200), pre, 8)
    assert padded == (240, 210) and net == (128, 112)
    assert net[0] / padded[0] == net[1] / padded[1] == 128 / 240
    assert net_shape((240, 240), pre, 8) == ((240, 240), (128, 128))  # training size: as trained


def test_non_square_case_predicts_like_the_square_one(module, case, reference):
    """Cutting 40 voxels off y changes nothing inside the rest of the brain's slices."""
    part = Case("part", case.image[:, :, 20:220].copy(), None, case.affine.copy())
    part.affine[:3, 3] += part.affine[:3, 1] * 20
    labels = predict_case(module, part)
    assert labels.shape == (240, 200, 155)
    assert dice(labels > 0, reference[:, 20:220] > 0) >= 0.9


def oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    return out


def test_oblique_and_2d_inputs_are_refused(trained, case, tmp_path, capsys):
    tilted = write_case(
        tmp_path / "tilted", Case("tilted", case.image[..., 70:74], None, oblique(case.affine, 10))
    )
    out = tmp_path / "seg.nii.gz"
    code = predict_main(
        [
            "--checkpoint",
            str(trained["ckpt"]),
            "--input",
            str(tilted),
            "--output",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "oblique affine" in err[0] and "tilted" in err[0]

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in MODALITIES:
        nib.save(nib.Nifti1Image(case.image[0, :, :, 70], np.eye(4)), flat / f"flat_{name}.nii.gz")
    code = predict_main(
        [
            "--checkpoint",
            str(trained["ckpt"]),
            "--input",
            str(flat),
            "--output",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "expected a 3D volume" in err[0] and "flat_flair" in err[0]


def test_slightly_tilted_affine_is_accepted(module, case):
    """Within the tolerance the affine is taken as axis-aligned (scanner rounding)."""
    tilt = Case("tilt", case.image[..., 70:72], None, oblique(case.affine, 0.5))
    assert predict_case(module, tilt).shape == (240, 240, 2)


# ---------------------------------------------------------------- slices


def test_training_and_inference_keep_the_same_slices(tmp_path, demo_root):
    """The data module's slice filter and inference's are one: the same z of each case."""
    cfg = compose_tiny(tmp_path, demo_root, ["data.crop=160"])
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    pre = dm.preprocessing()
    for split in ("train", "val"):
        for raw in dm.raw_cases(split):
            kept = {z for cid, z in dm.index[split] if cid == raw.case_id}
            replay = NetInput.of(raw.image, raw.affine, pre, raw.case_id)
            assert set(replay.keep.tolist()) == kept
            assert 0 < len(kept) < raw.image.shape[3]  # the filter does drop slices here


# ---------------------------------------------------------------- augmentation


def test_default_flip_is_left_right():
    """Store slices are (X, Y) in LPS: X runs right to left. The default flip mirrors X only."""
    torch.manual_seed(0)
    image = torch.zeros(64, 1, 8, 6)
    image[:, 0, 0, 0] = 1.0  # a marker in the right-posterior corner
    labels = torch.zeros(64, 8, 6, dtype=torch.uint8)
    out, _ = Augment()(image, labels)
    corners = {tuple(torch.nonzero(o[0]).tolist()[0]) for o in out}
    assert corners == {(0, 0), (7, 0)}  # unchanged, or flipped along X; never along Y
    flipped_y, _ = Augment(flip_x=0.0, flip_y=1.0)(image[:1], labels[:1])
    assert torch.nonzero(flipped_y[0, 0]).tolist() == [[0, 5]]


# ---------------------------------------------------------------- checkpoints as data


def test_checkpoint_with_an_object_is_refused(trained, demo_root, tmp_path, capsys):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    ckpt["extra"] = argparse.Namespace(note=pathlib.PurePosixPath("x"))
    bad = tmp_path / "handed.ckpt"
    torch.save(ckpt, bad)
    out = tmp_path / "seg.nii.gz"
    args = [
        "--checkpoint",
        str(bad),
        "--input",
        str(demo_root / "BraTS20_Training_001"),
        "--output",
        str(out),
        "--quiet",
    ]
    assert predict_main(args) == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "handed.ckpt" in err[0] and "argparse.Namespace" in err[0]
    assert "--trust-checkpoint" in err[0]
    assert predict_main([*args, "--trust-checkpoint"]) == 0 and out.exists()


def unreadable_checkpoint(kind: str, real: Path, folder: Path) -> Path:
    """A file that is no checkpoint: text, random bytes, or a real checkpoint cut in half."""
    path = folder / f"{kind}.ckpt"
    if kind == "text":
        path.write_bytes(b"garbage\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["text", "random", "truncated"])
@pytest.mark.parametrize("prog", ["predict", "export"])
def test_unreadable_checkpoint_is_named_not_taken_for_code(
    trained, demo_root, tmp_path, capsys, kind, prog
):
    """A file that is not a readable checkpoint says so in one line; it is not refused as a
    checkpoint holding code, and --trust-checkpoint is not offered."""
    from tumorseg.cli.export import main as export_main

    bad = unreadable_checkpoint(kind, trained["ckpt"], tmp_path)
    if prog == "predict":
        out = tmp_path / "seg.nii.gz"
        case = demo_root / "BraTS20_Training_001"
        code = predict_main(
            ["--checkpoint", str(bad), "--input", str(case), "--output", str(out), "--quiet"]
        )
    else:
        out = tmp_path / "net.onnx"
        code = export_main(["--checkpoint", str(bad), "--output", str(out)])
    assert code == 2 and not out.exists()
    assert list(tmp_path.iterdir()) == [bad]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad.name}:" in err[0]
    expected = "truncated checkpoint" if kind == "truncated" else "not a PyTorch checkpoint"
    assert expected in err[0]
    assert "trust-checkpoint" not in err[0] and "run as code" not in err[0]
