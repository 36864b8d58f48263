"""`tumorseg-predict` and `tumorseg.inference.overlay`: inputs, geometry, conventions, TTA,
errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from tests.conftest import compose_tiny
from tumorseg.bench.inference import predict_case_naive
from tumorseg.bench.pipeline import predict_case_before
from tumorseg.cli.evaluate import main as evaluate_main
from tumorseg.cli.predict import main
from tumorseg.core.labels import CONVENTIONS, from_canonical, to_canonical
from tumorseg.data.case import MODALITIES, Case
from tumorseg.data.readers import read_any
from tumorseg.inference.overlay import overlay_figure, panels
from tumorseg.inference.predict import (
    ET,
    NCR,
    load_for_inference,
    predict_case,
    remove_small_et,
    slice_probs,
)
from tumorseg.train import run

# seaborn 0.13 passes matplotlib 3.11's deprecated ``vert`` to boxplot (evaluate's box plot)
pytestmark = pytest.mark.filterwarnings("ignore:vert. bool was deprecated")

CASE = "BraTS20_Training_001"
NEW_CASE = "BraTS-GLI-00000-000"
NEW_NAMES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
MSD_AFFINE = np.array([[1.0, 0, 0, -120], [0, 1.0, 0, -120], [0, 0, 1.0, -60], [0, 0, 0, 1]])


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> Path:
    """A tiny region U-Net (features 8-16-32, trained at 64x64) after six short epochs: enough
    to paint every label, enhancing tumour included (a second or two of training)."""
    tmp = tmp_path_factory.mktemp("train")
    overrides = ["trainer.max_epochs=6", "trainer.limit_train_batches=20", "test=false"]
    run(compose_tiny(tmp, demo_root, [*overrides, "~logger", "~callbacks.lr_monitor"]))
    return next((tmp / "out" / "checkpoints").glob("epoch_*.ckpt"))


@pytest.fixture(scope="module")
def module(ckpt: Path):
    return load_for_inference(ckpt, "cpu")


@pytest.fixture(scope="module")
def reference(module, demo_root: Path) -> np.ndarray:
    """Canonical prediction of the first demo case through the Python API: some tumour, some
    background, so that equality with it says something."""
    labels = predict_case(module, read_any(demo_root / CASE, labelled=False))
    tumour = np.count_nonzero(labels)
    assert 0 < tumour < labels.size, f"the reference net paints {tumour} tumour voxels"
    assert len(np.unique(labels)) >= 3, f"the reference has labels {np.unique(labels)} only"
    return labels


def src(demo_root: Path, name: str) -> Path:
    return demo_root / CASE / f"{CASE}_{name}.nii.gz"


def link_case(folder: Path, demo_root: Path, names: dict[str, str], sep: str = "_") -> Path:
    """A case folder whose files link to the first demo case: ``{demo name: new suffix}``."""
    folder.mkdir(parents=True)
    for name, new in names.items():
        (folder / f"{folder.name}{sep}{new}.nii.gz").symlink_to(src(demo_root, name))
    return folder


def new_case(tmp_path: Path, demo_root: Path) -> Path:
    """The first demo case renamed to BraTS 2023 naming, its seg in 0/1/2/3."""
    names = {m: NEW_NAMES[m] for m in MODALITIES}
    folder = link_case(tmp_path / NEW_CASE, demo_root, names, sep="-")
    seg = nib.load(src(demo_root, "seg"))
    labels = from_canonical(to_canonical(np.asarray(seg.dataobj), "brats2020"), "brats2023")
    nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), folder / f"{NEW_CASE}-seg.nii.gz")
    return folder


def msd_image(tmp_path: Path, demo_root: Path, zs: slice = slice(60, 100)) -> Path:
    """An MSD-style 4D image (FLAIR, T1w, T1gd, T2w) of a z-range of the first demo case,
    with another affine and qform/sform codes 1/1."""
    data = np.stack(
        [np.asarray(nib.load(src(demo_root, m)).dataobj)[..., zs] for m in MODALITIES], -1
    )
    img = nib.Nifti1Image(data, None)
    img.set_qform(MSD_AFFINE, code=1)
    img.set_sform(MSD_AFFINE, code=1)
    path = tmp_path / "Task01_BrainTumour" / "imagesTs" / "BRATS_001.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(img, path)
    return path


def predict(ckpt: Path, *args: str | Path) -> int:
    return main(["--checkpoint", str(ckpt), "--quiet", *map(str, args)])


def assert_geometry(out: Path, ref: Path, convention: str) -> np.ndarray:
    """Output matches the reference file's grid; returns its canonical labels."""
    got, want = nib.load(out), nib.load(ref)
    assert got.shape == want.shape[:3]
    assert np.array_equal(got.affine, want.affine)
    for code in ("qform_code", "sform_code"):
        assert got.header[code] == want.header[code], code
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(want.affine)
    assert got.get_data_dtype() == np.uint8
    data = np.asarray(got.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data)) <= set(CONVENTIONS[convention])
    return to_canonical(data, convention)


# ---------------------------------------------------------------- inputs and geometry


def test_case_folder_with_seg_and_overlay(ckpt, demo_root, reference, tmp_path):
    out, png = tmp_path / "seg.nii.gz", tmp_path / "overlay.png"
    assert predict(ckpt, "--input", demo_root / CASE, "--output", out, "--overlay", png) == 0
    labels = assert_geometry(out, src(demo_root, "flair"), "brats2020")
    assert np.array_equal(labels, reference)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png", "seg.nii.gz"]


@pytest.mark.parametrize("kind", ["no_seg", "explicit_files", "brats2023"])
def test_other_inputs_same_prediction(kind, ckpt, demo_root, reference, tmp_path):
    out = tmp_path / "out" / "seg.nii.gz"  # the missing folder is created
    if kind == "no_seg":
        folder = link_case(tmp_path / CASE, demo_root, {m: m for m in MODALITIES})
        args, convention = ["--input", folder], "brats2020"
    elif kind == "explicit_files":
        args = [x for m in MODALITIES for x in (f"--{m}", src(demo_root, m))]
        convention = "brats2020"
    else:
        args, convention = ["--input", new_case(tmp_path, demo_root)], "brats2023"
    assert predict(ckpt, *args, "--output", out) == 0
    assert np.array_equal(assert_geometry(out, src(demo_root, "flair"), convention), reference)


def test_labels_override(ckpt, demo_root, reference, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert predict(ckpt, "--input", demo_root / CASE, "--output", out, "--labels", "brats2023") == 0
    assert np.array_equal(assert_geometry(out, src(demo_root, "flair"), "brats2023"), reference)


def test_msd_4d_image(ckpt, module, demo_root, tmp_path):
    image = msd_image(tmp_path, demo_root)
    out = tmp_path / "seg.nii.gz"
    assert predict(ckpt, "--input", image, "--output", out) == 0
    labels = assert_geometry(out, image, "msd")
    got = nib.load(out)
    assert got.shape == (240, 240, 40) and nib.aff2axcodes(got.affine) == ("R", "A", "S")
    case = read_any(demo_root / CASE, labelled=False)
    case = Case("msd", case.image[..., 60:100], None, MSD_AFFINE)
    assert np.array_equal(labels, predict_case(module, case))


@pytest.mark.parametrize("threads", [True, False], ids=["threads", "in_turn"])
def test_folder_of_cases_then_evaluate(
    ckpt, module, demo_root, tmp_path, capsys, monkeypatch, threads
):
    """A folder, with reader and writer threads or in turn: each output equals the case
    predicted alone, and the command reports its throughput."""
    monkeypatch.setattr("tumorseg.inference.folder.spare_cores", lambda module: threads)
    root = tmp_path / "cases"  # two of the demo cases
    cases = sorted(p.name for p in demo_root.iterdir() if p.is_dir())[:2]
    for cid in cases:
        (root / cid).mkdir(parents=True)
        for f in (demo_root / cid).iterdir():
            (root / cid / f.name).symlink_to(f)
    out = tmp_path / "preds"
    assert predict(ckpt, "--input", root, "--output", out) == 0
    printed = capsys.readouterr().out
    assert "2 cases in " in printed and "cases/min" in printed
    assert sorted(p.name for p in out.iterdir()) == [f"{c}.nii.gz" for c in cases]
    for cid in cases:
        assert_geometry(out / f"{cid}.nii.gz", root / cid / f"{cid}_flair.nii.gz", "brats2020")
        alone = predict_case(module, read_any(root / cid, labelled=False))
        written = to_canonical(np.asarray(nib.load(out / f"{cid}.nii.gz").dataobj), "brats2020")
        assert np.array_equal(written, alone), cid
    csv = tmp_path / "metrics.csv"
    overlays = tmp_path / "overlays"
    argv = ["--predictions", out, "--references", root, "--output", csv, "--quiet"]
    assert evaluate_main([str(a) for a in [*argv, "--overlays", overlays]]) == 0
    df = pd.read_csv(csv)
    assert sorted(df["case_id"].unique()) == cases and len(df) == 5 * len(cases)  # 5 regions
    assert df["dice"].between(0, 1).all()
    pngs = sorted(p.name for p in overlays.iterdir())
    assert pngs == [f"{c}.png" for c in cases]
    assert (overlays / pngs[0]).read_bytes()[:4] == b"\x89PNG"


# The fast path decides regions on the logits' sign (float32's sigmoid rounds logits under
# 1.2e-7 to 0.5) and resizes them in plain memory layout: labels may differ on this fraction.
FAST_PATH_TOLERANCE = 1e-4


@pytest.mark.parametrize("batch_size", [32, 64])
def test_fast_path_gives_the_labels_of_the_lightning_module(ckpt, module, demo_root, batch_size):
    """Today's path (the LightningModule from the checkpoint, probabilities) and the fast one
    (``Predictor``, logits, any batch size) label the demo cases alike."""
    from tumorseg.training.module import load_checkpoint

    lightning = load_checkpoint(ckpt).eval()
    lightning.net.to(memory_format=torch.channels_last)
    for cid in sorted(p.name for p in demo_root.iterdir() if p.is_dir())[:2]:
        case = read_any(demo_root / cid, labelled=False)
        before = predict_case_before(lightning, case)
        now = predict_case(module, case, batch_size=batch_size)
        assert (before > 0).sum() > 0
        assert (now != before).mean() <= FAST_PATH_TOLERANCE, cid


def test_predict_imports_no_lightning(ckpt, demo_root, tmp_path):
    """``tumorseg-predict`` on a case reads the checkpoint without Lightning (nor Hydra,
    MLflow): those imports alone take seconds of its start-up."""
    import subprocess
    import sys

    out = tmp_path / "seg.nii.gz"
    code = (
        "import sys\n"
        "from tumorseg.cli.predict import main\n"
        f"rc = main(['--checkpoint', {str(ckpt)!r}, '--input', {str(demo_root / CASE)!r}, "
        f"'--output', {str(out)!r}, '--quiet'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'hydra', 'mlflow', 'omegaconf'})\n"
        "print('heavy:', heavy)\n"
        "sys.exit(rc or bool(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.is_file()


def as_if_saved_on_gpu(ckpt: Path, out: Path) -> Path:
    """A copy of ``ckpt`` whose tensors are recorded as living on ``cuda:0``."""
    with zipfile.ZipFile(ckpt) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):  # pickled storage locations
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info, data)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading without a GPU")
def test_gpu_checkpoint_loads_on_cpu(ckpt, module, tmp_path):
    gpu = as_if_saved_on_gpu(ckpt, tmp_path / "gpu.ckpt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu, weights_only=False)  # the file really points at a GPU
    loaded = load_for_inference(gpu, "auto")
    assert loaded.device.type == "cpu"
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------- conventions, TTA, post


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_conventions_round_trip(convention):
    canonical = np.arange(4, dtype=np.uint8).repeat(3).reshape(3, 2, 2)
    there = from_canonical(canonical, convention)
    assert set(np.unique(there)) <= set(CONVENTIONS[convention])
    assert np.array_equal(to_canonical(there, convention), canonical)


def test_tta_symmetric_input_gives_symmetric_prediction(module, demo_root):
    case = read_any(demo_root / CASE, labelled=False)
    image = case.image[..., 70:78]
    image = (image + image[:, ::-1]) / 2  # left-right symmetric (first spatial axis)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(3, 0, 1, 2)))
    with torch.inference_mode():
        probs = slice_probs(module, x, tta=True, dtype=torch.bfloat16)
        plain = slice_probs(module, x, tta=False, dtype=torch.bfloat16)
    assert torch.equal(probs, probs.flip(-2))
    assert not torch.equal(plain, plain.flip(-2))  # the net alone is not symmetric
    labels = predict_case(module, Case("sym", image, None, case.affine), tta=True)
    assert np.array_equal(labels, labels[::-1])


def test_remove_small_et():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:8, 2:8, 2:8] = 2
    labels[3:7, 3:7, 3:7] = ET  # 64 voxels
    labels[12:14, 12:14, 12] = ET  # 4-voxel island
    labels[15, 15, 15] = ET  # touches the island only diagonally: its own component
    out = remove_small_et(labels, 10)
    assert (out[3:7, 3:7, 3:7] == ET).all()
    assert (out[12:14, 12:14, 12] == NCR).all() and out[15, 15, 15] == NCR
    assert np.array_equal(out != labels, (labels == ET) & (out == NCR))
    assert np.array_equal(remove_small_et(labels, 0), labels)
    assert np.array_equal(remove_small_et(labels, 4)[12:14, 12:14, 12], labels[12:14, 12:14, 12])


def test_min_et_voxels_option(ckpt, demo_root, tmp_path):
    """Against the same prediction without the option: ET components under the threshold
    become NCR, the larger ones and every other voxel stay."""
    plain, pruned = tmp_path / "plain.nii.gz", tmp_path / "pruned.nii.gz"
    assert predict(ckpt, "--input", demo_root / CASE, "--output", plain) == 0
    before = np.asarray(nib.load(plain).dataobj)
    components, count = ndimage.label(before == 4, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    small, large = np.flatnonzero(sizes < 50) + 1, np.flatnonzero(sizes >= 50) + 1
    assert len(small), f"ET component sizes {sorted(sizes)}: nothing to prune"
    argv = ["--input", demo_root / CASE, "--output", pruned, "--min-et-voxels", "50"]
    assert predict(ckpt, *argv) == 0
    after = np.asarray(nib.load(pruned).dataobj)
    in_small, in_large = np.isin(components, small), np.isin(components, large)
    assert (after[in_small] == 1).all()  # NCR in BraTS 2020 labels
    assert (after[in_large] == 4).all()
    assert np.array_equal(after[~in_small], before[~in_small])


def test_batched_matches_naive_loop(module, demo_root):
    case = read_any(demo_root / CASE, labelled=False)
    case = Case(CASE, case.image[..., 60:70], None, case.affine)
    fast = predict_case(module, case, batch_size=4, autocast=False)
    naive = predict_case_naive(module, module.net, case)
    assert (fast != naive).mean() < 1e-4


# ---------------------------------------------------------------- bad input


def truncate(path: Path) -> None:
    """Replace a link to a demo file by the first half of that file's bytes."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def bad_inputs(tmp: Path, demo_root: Path) -> dict[str, tuple[list, str]]:
    """Bad input name -> (arguments, text the one-line message must contain)."""
    every = {m: m for m in (*MODALITIES, "seg")}
    missing = link_case(tmp / "missing" / CASE, demo_root, {m: m for m in ("flair", "t1", "t2")})
    truncated = link_case(tmp / "truncated" / CASE, demo_root, every)
    truncate(truncated / f"{CASE}_t2.nii.gz")
    shapes = link_case(tmp / "shapes" / CASE, demo_root, {m: m for m in MODALITIES[:3]})
    t2 = nib.load(src(demo_root, "t2"))
    small = nib.Nifti1Image(np.asarray(t2.dataobj)[:, :, :100], t2.affine, t2.header)
    nib.save(small, shapes / f"{CASE}_t2.nii.gz")
    # a folder of two cases, the second one broken: the first one's outputs must not stay
    link_case(tmp / "mixed" / CASE, demo_root, every)
    second = CASE.replace("001", "002")
    truncate(link_case(tmp / "mixed" / second, demo_root, every) / f"{second}_t1.nii.gz")
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    good = ["--input", demo_root / CASE]
    return {
        "missing_modality": (["--input", missing], f"{missing}: missing modality t1ce"),
        "truncated_file": (["--input", truncated], f"{CASE}_t2.nii.gz"),
        "mismatched_shapes": (["--input", shapes], f"{CASE}_t2.nii.gz"),
        "missing_checkpoint": ([*good, "--checkpoint", tmp / "none.ckpt"], "none.ckpt"),
        "bad_checkpoint": ([*good, "--checkpoint", garbage], "garbage.ckpt"),
        "bad_case_in_folder": (["--input", tmp / "mixed"], f"{second}_t1.nii.gz"),
        "missing_input": (["--input", tmp / "nowhere"], "nowhere"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "missing_modality",
        "truncated_file",
        "mismatched_shapes",
        "missing_checkpoint",
        "bad_checkpoint",
        "bad_case_in_folder",
        "missing_input",
    ],
)
def test_bad_input_exits_2_and_writes_nothing(name, ckpt, demo_root, tmp_path, capsys):
    args, named = bad_inputs(tmp_path / "in", demo_root)[name]
    out = tmp_path / "out"
    many = name == "bad_case_in_folder"  # outputs are folders
    seg, png = (out, out) if many else (out / "seg.nii.gz", out / "overlay.png")
    argv = ["--checkpoint", ckpt, *args, "--output", seg, "--overlay", png, "--quiet"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tumorseg-predict: error: ") and named in err[0], err
    assert not out.exists()


def test_bad_arguments(capsys):
    assert main(["--input", "x", "--output", "y.nii.gz"]) == 2  # no checkpoint
    assert main(["--checkpoint", "c", "--output", "y.nii.gz", "--flair", "f"]) == 2
    assert main(["--checkpoint", "c", "--input", "x", "--output", "y", "--batch-size", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("tumorseg-predict: error:") for line in lines)
    assert "missing --t1 --t1ce --t2" in lines[1]


# ---------------------------------------------------------------- overlay


def marked_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A volume with a bright marker and a tumour on the subject's right, anterior, superior
    side, in LPS voxel order (BraTS affine): high x is the subject's left."""
    image = np.ones((40, 30, 20), dtype=np.float32)
    seg = np.zeros(image.shape, dtype=np.uint8)
    seg[5:10, 3:8, 14:18] = 2  # low x = right, low y = anterior (LPS), high z = superior
    seg[6:9, 4:7, 15:17] = ET
    image[seg > 0] = 5
    affine = np.array([[-1.0, 0, 0, 39], [0, -1.0, 0, 29], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    return image, seg, affine


def test_overlay_orientation_letters_and_marker_side():
    image, seg, affine = marked_volume()
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    views = {p.name: p for p in panels(image, seg, seg, affine)}
    axial, coronal, sagittal = views["axial"], views["coronal"], views["sagittal"]
    assert (axial.left, axial.right, axial.top, axial.bottom) == ("R", "L", "A", "P")
    assert (coronal.left, coronal.right, coronal.top, coronal.bottom) == ("R", "L", "S", "I")
    assert (sagittal.left, sagittal.right, sagittal.top, sagittal.bottom) == ("A", "P", "S", "I")
    rows, cols = np.nonzero(axial.truth)  # right-anterior: top left of the axial view
    assert cols.mean() < axial.truth.shape[1] / 2 and rows.mean() < axial.truth.shape[0] / 2
    rows, cols = np.nonzero(coronal.truth)  # right-superior: top left
    assert cols.mean() < coronal.truth.shape[1] / 2 and rows.mean() < coronal.truth.shape[0] / 2
    assert coronal.aspect == 2.0  # 2 mm slices
    assert all(p.truth.any() for p in views.values())  # each view cuts through the tumour


def test_overlay_figure():
    image, seg, affine = marked_volume()
    fig = overlay_figure(image, seg, None, affine, "case")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"R", "L", "A", "P", "S", "I"} <= texts
    with pytest.raises(ValueError, match="truth shape"):
        overlay_figure(image, seg[:-1], None, affine, "case")


# ---------------------------------------------------------------- benchmark


def test_benchmark_table(monkeypatch, capsys):
    """The report's shape, with the default (untrained) model; timings are faked."""
    fake = [4.0, 1.0, 2.0, 0.25, 0.5]  # naive, batched, TTA, replay alone, I/O
    monkeypatch.setattr(
        "tumorseg.bench.inference.best_times", lambda fns, repeats: fake[: len(fns)]
    )
    assert main(["--benchmark", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "features 16,32,64,128" in out and "240x240 -> net 128x128" in out
    assert "| naive: 1 slice at a time | 1 | fp32 | no | 4.00 | 1.00x |" in out
    assert "| batched + TTA (4 flips) | 32 |" in out and "| 2.00 | 2.00x |" in out
    assert "resizing; the same in every row): 0.25 s" in out
    assert "writing the result: 0.50 s" in out
