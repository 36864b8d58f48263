"""tumorseg-export: ONNX and TorchScript files that describe themselves, onnxruntime matching
torch on a real demo case, and tumorseg-predict --onnx through the same preprocessing replay.

One tiny net is trained once (no MLflow) and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch

from tests.conftest import compose_tiny
from tumorseg.cli.export import main as export_main
from tumorseg.cli.predict import main as predict_main
from tumorseg.data.preprocess import NetInput
from tumorseg.data.readers import list_cases
from tumorseg.inference.export import ONNX_TOLERANCE, OnnxRunner, read_torchscript_metadata
from tumorseg.inference.predict import load_for_inference, predict_case, slice_probs
from tumorseg.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict:
    """A one-epoch net on 160 x 160 crops resized to 96 x 96, exported to ONNX."""
    tmp = tmp_path_factory.mktemp("export")
    overrides = ["~logger", "callbacks.lr_monitor=null", "test=false", "trainer.max_epochs=1"]
    cfg = compose_tiny(tmp, demo_root, [*overrides, "data.crop=160", "data.image_size=96"])
    run(cfg)
    ckpt = next((tmp / "out" / "checkpoints").glob("epoch_*.ckpt"))
    onnx_file = tmp / "net.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--output", str(onnx_file)]) == 0
    return {"ckpt": ckpt, "onnx": onnx_file, "root": tmp}


@pytest.fixture(scope="module")
def case(demo_root: Path):
    return list_cases(demo_root, labelled=False)[0].load()


def test_onnx_file_describes_its_input_preprocessing_and_labels(trained):
    module = load_for_inference(trained["ckpt"], "cpu")
    model = onnx.load(str(trained["onnx"]))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["tumorseg_preprocessing"] == module.preprocessing.to_dict()
    assert meta["tumorseg_preprocessing"]["crop"] == 160
    assert meta["tumorseg_target"] == module.hparams.target
    assert meta["tumorseg_input"]["train_size"] == [96, 96]
    assert meta["tumorseg_input"]["channels"] == ["flair", "t1", "t1ce", "t2"]
    assert meta["tumorseg_labels"]["convention"] == "canonical"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 4 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))


def test_onnxruntime_matches_torch_on_a_demo_case(trained, case):
    """Probabilities of every kept slice of a real case agree to ONNX_TOLERANCE (fp32 both),
    and the labels of the whole case are the same."""
    module = load_for_inference(trained["ckpt"], "cpu")
    runner = OnnxRunner(trained["onnx"])
    replay = NetInput.of(case.image, case.affine, module.preprocessing, case.case_id)
    with torch.inference_mode():
        want = slice_probs(module, replay.image, dtype=None)
        got = slice_probs(runner, replay.image, dtype=None)
    assert got.shape == want.shape and len(replay.keep) > 50
    assert (got - want).abs().max().item() <= ONNX_TOLERANCE
    labels_torch = predict_case(module, case, autocast=False)
    assert np.array_equal(predict_case(runner, case), labels_torch)


def test_predict_onnx_writes_the_checkpoints_segmentation(trained, case, demo_root, tmp_path):
    out = tmp_path / "seg.nii.gz"
    folder = demo_root / case.case_id
    args = ["--onnx", str(trained["onnx"]), "--input", str(folder), "--output", str(out)]
    assert predict_main([*args, "--quiet", "--labels", "brats2023"]) == 0
    module = load_for_inference(trained["ckpt"], "cpu")
    want = predict_case(module, case, autocast=False)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), want)


def test_torchscript_export_carries_the_metadata_and_the_same_logits(trained, tmp_path):
    out = tmp_path / "net.pt"
    code = export_main(
        ["--checkpoint", str(trained["ckpt"]), "--format", "torchscript", "--output", str(out)]
    )
    assert code == 0
    meta = read_torchscript_metadata(out)
    module = load_for_inference(trained["ckpt"], "cpu")
    assert meta["tumorseg_preprocessing"] == module.preprocessing.to_dict()
    x = torch.randn(3, 4, 96, 112)
    with torch.inference_mode():
        want = module.net.float().to(memory_format=torch.contiguous_format)(x)
        got = torch.jit.load(str(out))(x)
    assert torch.allclose(got, want, atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(trained, case, demo_root, tmp_path, capsys):
    plain = tmp_path / "plain.onnx"  # an ONNX file without tumorseg metadata
    model = onnx.load(str(trained["onnx"]))
    del model.metadata_props[:]
    onnx.save(model, str(plain))
    seg = tmp_path / "seg.nii.gz"
    folder = str(demo_root / case.case_id)
    assert predict_main(["--onnx", str(plain), "--input", folder, "--output", str(seg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a tumorseg export" in err[0] and str(plain) in err[0]
    out = tmp_path / "x.onnx"
    missing = tmp_path / "missing.ckpt"
    assert export_main(["--checkpoint", str(missing), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such checkpoint" in err[0]
    assert export_main(["--checkpoint", str(trained["ckpt"]), "--output", str(tmp_path)]) == 2
    assert not seg.exists() and not out.exists() and not list(tmp_path.glob(".*partial"))
