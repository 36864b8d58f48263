"""Export a trained net to ONNX or TorchScript, self-described, and run an ONNX file.

The exported graph is the net alone: preprocessed slices ``(N, 4, H, W)`` float32 in, logits
``(N, C, H, W)`` out, with ``N``, ``H`` and ``W`` free (``H`` and ``W`` multiples of the net's
size step). Everything else a prediction needs travels in the file's metadata (ONNX
``metadata_props``; TorchScript ``_extra_files``), each value a JSON string:

* ``tumorseg_preprocessing``: the recorded ``Preprocessing`` (orientation, spacing, z-score crop,
  slice filter, training slice and net sizes), replayed by ``tumorseg.inference.predict``;
* ``tumorseg_target``: ``regions`` (3 sigmoid channels WT/TC/ET) or ``labels`` (4 softmax
  channels) and how labels are decided from them (``tumorseg.core.labels.target``);
* ``tumorseg_input``: input name, layout, channels (modalities in order), size step and the
  training net size; ``tumorseg_labels``: the output label convention (canonical: 0 background,
  1 NCR, 2 ED, 3 ET; ``tumorseg-predict --labels`` converts);
* ``tumorseg_model``: variant, net config and the source checkpoint's name.

:class:`OnnxRunner` stands in for the module in ``tumorseg.inference.predict.predict_case`` (it has
``net``, ``preprocessing``, ``hparams.target`` and ``device``), so an ONNX file predicts through
the same preprocessing replay as a checkpoint. Reading an ONNX file runs no Python code from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tumorseg.core.errors import DataError, first_line
from tumorseg.core.labels import CONVENTIONS
from tumorseg.data.case import MODALITIES
from tumorseg.data.preprocess import Preprocessing
from tumorseg.inference.predict import size_step
from tumorseg.training.module import SegModule

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
INPUT, OUTPUT = "image", "logits"
KEYS = ("tumorseg_preprocessing", "tumorseg_target", "tumorseg_input", "tumorseg_labels")
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - torch| of fp32 probabilities the tests accept


def needs(package: str) -> Any:
    """``package`` imported, or a DataError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise DataError(f"ONNX needs {package}: pip install 'tumorseg[export]'") from None


def metadata(module: SegModule, checkpoint: str | Path | None = None) -> dict[str, str]:
    """What a prediction needs besides the graph, as JSON strings."""
    pre = module.preprocessing
    step = size_step(module)
    config = (module.config or {}).get("model", {})
    return {
        "tumorseg_preprocessing": json.dumps(pre.to_dict()),
        "tumorseg_target": json.dumps(module.hparams.target),
        "tumorseg_input": json.dumps(
            {
                "name": INPUT,
                "layout": "NCHW: preprocessed slices, N, H, W free",
                "channels": list(MODALITIES),
                "size_step": step,
                "train_size": list(train_size(pre, step)),
                "dtype": "float32",
            }
        ),
        "tumorseg_labels": json.dumps(
            {"convention": "canonical", "labels": {"0": "bg", "1": "NCR", "2": "ED", "3": "ET"}}
        ),
        "tumorseg_model": json.dumps(
            {
                "name": module.hparams.get("name"),
                "net": config.get("net"),
                "source": str(checkpoint) if checkpoint else None,
            },
            default=str,
        ),
    }


def train_size(pre: Preprocessing, step: int) -> tuple[int, int]:
    """The net's input size for a training slice."""
    if pre.image_size is not None:
        return pre.image_size, pre.image_size
    return tuple(n + (-n) % step for n in pre.slice_shape)


def export_net(module: SegModule) -> torch.nn.Module:
    """The module's net in fp32, contiguous memory, eval mode, on the CPU."""
    return module.net.float().to("cpu", memory_format=torch.contiguous_format).eval()


def export_onnx(module: SegModule, output: Path, checkpoint: str | Path | None = None) -> None:
    """Write the net as ONNX (dynamo exporter, free batch and slice sizes) with metadata."""
    onnx = needs("onnx")
    needs("onnxscript")

    net = export_net(module)
    h, w = train_size(module.preprocessing, size_step(module))
    example = torch.zeros(2, len(MODALITIES), h, w)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" lines
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "net.onnx"
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: dims[0], 2: dims[2], 3: dims[3]},),
            dynamo=True,
            verbose=False,
        )
        program.save(str(raw))
        model = onnx.load(str(raw))
    quiet.setLevel(level)
    onnx.helper.set_model_props(model, metadata(module, checkpoint))
    onnx.checker.check_model(model)
    onnx.save(model, str(output))


def export_torchscript(
    module: SegModule, output: Path, checkpoint: str | Path | None = None
) -> None:
    """Write the net as TorchScript (scripted, else traced: batch and slice size stay free, as
    the nets have no size-dependent branches) with the metadata as ``_extra_files``."""
    net = export_net(module)
    with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(net)
        except Exception as err:  # TorchScript cannot compile every net: trace it instead
            log.info(
                "scripting failed (%s); tracing (the input size check is dropped)", first_line(err)
            )
            h, w = train_size(module.preprocessing, size_step(module))
            scripted = torch.jit.trace(net, torch.zeros(2, len(MODALITIES), h, w))
        torch.jit.save(scripted, str(output), _extra_files=metadata(module, checkpoint))


def export(module: SegModule, fmt: str, output: Path, checkpoint: str | Path | None = None) -> None:
    """Export ``module`` as ``fmt`` (``onnx`` or ``torchscript``) to ``output``, all or nothing."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        (export_onnx if fmt == "onnx" else export_torchscript)(module, partial, checkpoint)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def read_torchscript_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a TorchScript file written by :func:`export`, decoded."""
    files = dict.fromkeys((*KEYS, "tumorseg_model"), "")
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return {k: json.loads(v) for k, v in files.items() if v}


# ---------------------------------------------------------------- running an ONNX file


class OnnxNet:
    """Callable like the net: ``(N, 4, H, W)`` tensor -> logits tensor, through onnxruntime."""

    def __init__(self, session: Any, step: int) -> None:
        self.session = session
        self.levels = int(math.log2(step)) + 1  # what ``inference.size_step`` reads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])

    def to(self, *args: Any, **kwargs: Any) -> OnnxNet:
        return self


class OnnxRunner:
    """An exported ONNX file in place of a ``SegModule`` for ``predict_case``: the net runs in
    onnxruntime (fp32, CPU), the preprocessing and target come from the file's metadata."""

    device = torch.device("cpu")

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = needs("onnxruntime")

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise DataError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
        props = session.get_modelmeta().custom_metadata_map
        missing = [k for k in KEYS if k not in props]
        if missing:
            raise DataError(f"{path}: not a tumorseg export (no {', '.join(missing)} metadata)")
        try:
            self.meta = {k: json.loads(v) for k, v in props.items() if k.startswith("tumorseg_")}
            self.preprocessing = Preprocessing.from_dict(self.meta["tumorseg_preprocessing"])
            step = int(self.meta["tumorseg_input"]["size_step"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: bad tumorseg metadata ({first_line(err)})") from None
        if self.meta["tumorseg_labels"].get("convention") not in ("canonical", *CONVENTIONS):
            raise DataError(f"{path}: unknown label convention in its metadata")
        self.path = path
        self.net = OnnxNet(session, step)
        self.hparams = SimpleNamespace(
            target=self.meta["tumorseg_target"],
            name=(self.meta.get("tumorseg_model") or {}).get("name", "onnx"),
        )
        self.config = {"model": {"net": (self.meta.get("tumorseg_model") or {}).get("net") or {}}}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def eval(self) -> OnnxRunner:
        return self
