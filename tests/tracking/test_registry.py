"""Models in MLflow: a training run logs its kept checkpoint as an MLflow model and registers
it; tumorseg-predict finds the checkpoint again from ``--run``, ``runs:/`` and ``models:/``
URIs without running code from the store; a study's best trial becomes ``@champion``; the
model loaded by ``mlflow.pyfunc.load_model`` also segments case folders given as paths, as
tumorseg-predict does.

One tiny run is trained into a real local store (SQLite + artifact folder) and shared.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from packaging.version import Version

from tests.conftest import compose_tiny
from tumorseg.cli.predict import main as predict_main
from tumorseg.cli.register import main as register_main
from tumorseg.core.errors import DataError
from tumorseg.core.labels import to_canonical
from tumorseg.data.case import BRATS_AFFINE, MODALITIES, Case
from tumorseg.data.readers import list_cases
from tumorseg.inference.predict import load_for_inference, predict_case
from tumorseg.tracking.registry import pin, pinned_requirements, using
from tumorseg.train import run

NAME = "tumorseg-test"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict:
    """A one-epoch run in a local store, its model registered as ``tumorseg-test``."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"  # the local store of paths.root_dir
    cfg = compose_tiny(
        tmp,
        demo_root,
        [
            "trainer.max_epochs=1",
            "test=false",
            "overlay_cases=0",
            "callbacks.system_metrics=null",
            f"registered_model_name={NAME}",
        ],
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", "")  # undone after the run, which also exports it
        env.delenv("MLFLOW_TRACKING_URI")
        run(cfg)
    client = MlflowClient(uri)
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    ckpt = next((tmp / "out" / "checkpoints").glob("epoch_*.ckpt"))
    return {"uri": uri, "run_id": found.info.run_id, "ckpt": ckpt, "root": tmp}


@pytest.fixture(scope="module")
def small_case(trained: dict, demo_root: Path) -> Path:
    """A demo case cut to 40 of its slices (quick to predict; whole slices, so that the slice
    filter keeps the brain ones)."""
    case = list_cases(demo_root, labelled=False)[0].load()
    folder = trained["root"] / "case" / "small"
    folder.mkdir(parents=True)
    image = case.image[..., 55:95]
    affine = case.affine.copy()
    affine[:3, 3] = case.affine[:3, :3] @ np.array([0, 0, 55]) + case.affine[:3, 3]
    for k, mod in enumerate(MODALITIES):
        nib.save(nib.Nifti1Image(image[k], affine), folder / f"small_{mod}.nii.gz")
    return folder


def predict(args: list[str], case: Path, out: Path, uri: str) -> int:
    return predict_main(
        [*args, "--input", str(case), "--output", str(out), "--tracking-uri", uri, "--quiet"]
    )


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def model_folder(trained: dict) -> Path:
    """The logged model's folder in the store's artifact location."""
    (spec,) = trained["root"].glob("mlartifacts/**/MLmodel")
    return spec.parent


def test_best_checkpoint_is_logged_as_a_model_from_code(trained):
    """The model has a signature, a small input example and pinned requirements, and is the
    project's source file plus the checkpoint: nothing pickled."""
    folder = model_folder(trained)
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = spec["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("mlflow_model.py")
    assert "python_model" not in flavor and not list(folder.glob("**/*.pkl"))
    ckpt = folder / flavor["artifacts"]["checkpoint"]["path"]
    assert ckpt.read_bytes() == trained["ckpt"].read_bytes()
    inputs = yaml.safe_load(spec["signature"]["inputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [4, -1, -1, -1]}
    assert spec["saved_input_example_info"]["type"] == "ndarray"
    requirements = (folder / "requirements.txt").read_text().split()
    # the pin a user on another machine can install: the public version, without the local
    # label of the installed build (2.14.1+cu130, 2.13.0+cpu), which no other index resolves
    public = Version(__import__("torch").__version__).public
    assert "torch==" + public in requirements
    assert not any("+" in line for line in requirements), requirements
    assert all("==" in line for line in requirements), requirements
    with using(trained["uri"]):
        run = mlflow.get_run(trained["run_id"])
        assert run.outputs.model_outputs, "the run lists no model (Models column empty)"
        version = MlflowClient().get_registered_model(NAME).latest_versions[0]
    assert version.run_id == trained["run_id"]


def test_pyfunc_predicts_through_the_project_inference(trained, small_case):
    """mlflow.pyfunc's predict on a (4, X, Y, Z) volume in BraTS layout equals predict_case on
    the same volume with the BraTS affine, labels and all."""
    case = list_cases(small_case.parent, labelled=False)[0].load()
    with using(trained["uri"]):
        model = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")
        got = model.predict(case.image)
    module = load_for_inference(trained["ckpt"], "cpu")
    want = predict_case(module, Case("x", case.image, None, BRATS_AFFINE))
    assert got.dtype == np.uint8 and got.shape == case.image.shape[1:]
    assert len(np.unique(want)) > 1, "the net predicts one label only: nothing to compare"
    assert np.array_equal(got, want)


def reoriented_case(small_case: Path, folder: Path, naming: str) -> Path:
    """``small_case`` stored in another orientation (axes S, R, A instead of the BraTS L, P, S:
    the slices lie along what was the z axis), same physical image, as a case folder in the
    BraTS 2020 (``ID_flair``) or 2023 (``ID-t2f``) naming."""
    names = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
    folder.mkdir(parents=True)
    for mod in MODALITIES:
        img = nib.load(small_case / f"small_{mod}.nii.gz")
        to = ornt_transform(io_orientation(img.affine), axcodes2ornt(("S", "R", "A")))
        out = img.as_reoriented(to)
        name = f"{folder.name}-{names[mod]}" if naming == "brats2023" else f"{folder.name}_{mod}"
        nib.save(out, folder / f"{name}.nii.gz")
    return folder


def test_pyfunc_predicts_from_case_folders_as_tumorseg_predict_does(trained, small_case, tmp_path):
    """The model loaded by mlflow.pyfunc.load_model segments case folders given as paths (BraTS
    2020 and 2023 naming, stored in another orientation than BraTS's): each case's labels equal
    tumorseg-predict's output file on that case, voxel for voxel. The wrapper's own predict
    refuses a path (the logged tensor signature), which is why the model object is used."""
    cases = {
        naming: reoriented_case(small_case, tmp_path / naming / f"case{i}", naming)
        for i, naming in enumerate(("brats2020", "brats2023"))
    }
    want = {}
    for naming, folder in cases.items():
        out = tmp_path / f"{naming}.nii.gz"
        assert predict(["--checkpoint", str(trained["ckpt"])], folder, out, trained["uri"]) == 0
        want[naming] = to_canonical(labels(out), naming)
        assert want[naming].shape == (40, 240, 240)  # the case's own (S, R, A) grid
        assert len(np.unique(want[naming])) > 1, "one label only: nothing to compare"
    with using(trained["uri"]):
        model = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")
    with pytest.raises(MlflowException, match="tensor-based model signature"):
        model.predict(str(cases["brats2020"]))
    segmenter = model.unwrap_python_model()
    got = segmenter.predict(str(cases["brats2020"]))
    assert got.dtype == np.uint8 and np.array_equal(got, want["brats2020"])
    both = segmenter.predict([cases["brats2020"], str(cases["brats2023"])])
    assert isinstance(both, list) and len(both) == 2
    for labels_of_case, naming in zip(both, cases, strict=True):
        assert np.array_equal(labels_of_case, want[naming]), naming


def test_model_object_refuses_a_path_that_is_no_case_in_one_line(trained, tmp_path):
    with using(trained["uri"]):
        segmenter = mlflow.pyfunc.load_model(f"runs:/{trained['run_id']}/model")
    segmenter = segmenter.unwrap_python_model()
    for bad, message in ((tmp_path / "nowhere", "no such file"), (tmp_path, "not a BraTS case")):
        with pytest.raises(DataError) as err:
            segmenter.predict(str(bad))
        assert str(err.value).startswith(str(bad)) and message in str(err.value)
        assert len(str(err.value).splitlines()) == 1


def test_predict_from_run_and_model_uris_equals_the_checkpoint(trained, small_case, tmp_path):
    uri, run_id = trained["uri"], trained["run_id"]
    assert (
        predict(["--checkpoint", str(trained["ckpt"])], small_case, tmp_path / "c.nii.gz", uri) == 0
    )
    want = labels(tmp_path / "c.nii.gz")
    assert len(np.unique(want)) > 1, "the net predicts one label only: nothing to compare"
    MlflowClient(uri).set_registered_model_alias(NAME, "champion", "1")
    for i, args in enumerate(
        (
            ["--run", run_id],
            ["--model", f"runs:/{run_id}/model"],
            ["--model", f"models:/{NAME}/1"],
            ["--model", f"models:/{NAME}@champion"],
        )
    ):
        out = tmp_path / f"{i}.nii.gz"
        assert predict(args, small_case, out, uri) == 0, args
        assert np.array_equal(labels(out), want), args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run", "0123456789abcdef0123456789abcdef"], "no such run"),
        (["--model", "runs:/0123456789abcdef0123456789abcdef/model"], "cannot be resolved"),
        (["--model", f"models:/{NAME}@nobody"], "cannot be resolved"),
        (["--model", "models:/no-such-model/1"], "cannot be resolved"),
        (["--model", "/tmp/model"], "expected runs:/"),
    ],
)
def test_bad_run_or_model_uri_is_one_line_and_writes_nothing(
    trained, small_case, tmp_path, capsys, args, message
):
    out = tmp_path / "seg.nii.gz"
    assert predict(args, small_case, out, trained["uri"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tumorseg-predict: error: ") and message in err[0]
    assert not out.exists()


def test_model_uri_runs_no_code_from_the_store(trained, small_case, tmp_path):
    """The model's stored source is replaced by code that leaves a mark when run: predicting
    from the model URI must not run it (MLflow's own pyfunc loading does)."""
    mark = tmp_path / "ran"
    source = model_folder(trained) / "mlflow_model.py"
    original = source.read_text()
    source.write_text(original + f"\nimport pathlib\npathlib.Path({str(mark)!r}).touch()\n")
    try:
        out = tmp_path / "seg.nii.gz"
        uri = f"runs:/{trained['run_id']}/model"
        assert predict(["--model", uri], small_case, out, trained["uri"]) == 0
        assert not mark.exists(), "tumorseg-predict --model ran the model's stored source"
        with using(trained["uri"]):
            mlflow.pyfunc.load_model(uri)
        assert mark.exists(), "the planted source did not run under MLflow's own loading"
    finally:
        source.write_text(original)


def test_study_best_trial_is_registered_as_champion(trained, capsys):
    """A study's parent run names its best trial (as the sweeper writes it); tumorseg-register
    --study registers that trial's run, not another trial of the study."""
    uri, run_id = trained["uri"], trained["run_id"]
    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    parent = client.create_run(experiment, tags={"optuna_parent": "true", "best_trial": "1"})
    pid = parent.info.run_id
    other = client.create_run(experiment, tags={"optuna_trial": "0", "mlflow.parentRunId": pid})
    client.set_terminated(other.info.run_id)
    client.set_tag(run_id, "optuna_trial", "1")
    client.set_tag(run_id, "mlflow.parentRunId", pid)
    assert register_main(["--study", pid, "--name", "study-best", "--tracking-uri", uri]) == 0
    assert "models:/study-best@champion" in capsys.readouterr().out
    champion = client.get_model_version_by_alias("study-best", "champion")
    assert champion.run_id == run_id
    assert register_main(["--study", run_id, "--name", "x", "--tracking-uri", uri]) == 2
    assert "no best_trial" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "--run", "deadbeef"],
        ["predict", "--model", "runs:/deadbeef/model"],
        ["export", "--run", "deadbeef"],
        ["register", "--run", "deadbeef", "--name", "x"],
        ["register", "--study", "deadbeef", "--name", "x"],
    ],
)
def test_store_that_does_not_exist_is_one_line_and_not_created(demo_root, tmp_path, capfd, args):
    """A --tracking-uri naming a SQLite file that does not exist is refused in one line naming
    the store; opening it would create an empty store (and print MLflow's table creation)."""
    from tumorseg.cli.export import main as export_main

    store = tmp_path / "mlflow" / "m.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    prog, *rest = args
    rest += ["--tracking-uri", uri]
    if prog == "predict":
        out = tmp_path / "seg.nii.gz"
        rest += ["--input", str(demo_root / "BraTS20_Training_001"), "--output", str(out)]
        code = predict_main([*rest, "--quiet"])
    elif prog == "export":
        code = export_main([*rest, "--output", str(tmp_path / "net.onnx")])
    else:
        code = register_main(rest)
    assert code == 2
    assert not store.exists() and [p.name for p in tmp_path.iterdir()] == ["mlflow"]
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"tumorseg-{prog}: error: MLflow store {uri} does not exist"
    ]


@pytest.mark.parametrize(
    ("installed", "pinned"),
    [
        ("2.14.1+cu130", "torch==2.14.1"),
        ("2.13.0+cpu", "torch==2.13.0"),
        ("2.5.1+rocm6.2", "torch==2.5.1"),
        ("2.13.0", "torch==2.13.0"),
        ("2.6.0rc1", "torch==2.6.0rc1"),
    ],
)
def test_pin_drops_the_local_label_of_a_build(installed, pinned):
    """A build's local label (+cu130, +cpu, +rocm6.2) resolves on no other index: the pin keeps
    the public version, pre-releases included."""
    assert pin("torch", installed) == pinned


def test_pinned_requirements_are_installable_pins_of_the_core_dependencies():
    """Every core dependency pinned with ==, none with a local label, no extras' packages."""
    pins = pinned_requirements()
    names = {line.split("==")[0].lower() for line in pins}
    assert {"torch", "lightning", "mlflow", "nibabel"} <= names
    assert "pytest" not in names and "onnxruntime" not in names  # dev/export extras
    assert all("==" in line and "+" not in line for line in pins), pins
