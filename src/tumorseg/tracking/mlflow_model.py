"""A trained checkpoint as an MLflow model (logged and resolved by ``tumorseg.tracking.registry``).

The model is an MLflow *model from code*: ``mlflow.pyfunc.log_model`` is given the path of this
file, which MLflow copies into the model folder and, on ``mlflow.pyfunc.load_model``, runs as
source (it imports the installed ``tumorseg`` package and calls ``mlflow.models.set_model``).
Nothing is cloudpickled. The weights are the run's kept checkpoint, stored as the model artifact
``checkpoint`` and read by ``tumorseg.inference.predict.load_for_inference`` as data
(``torch.load(weights_only=True)``), so the model predicts through the project's own inference
(the checkpoint's recorded preprocessing, replayed).

What is trusted where:

* ``tumorseg-predict --model URI`` (``tumorseg.tracking.registry.checkpoint_from_model``)
  downloads the model folder, reads its ``MLmodel`` file as YAML (``yaml.safe_load``) to find
  the checkpoint, and loads the checkpoint as data. No code from the store is run: the copied
  source file is not executed, and this module is not imported.
* ``mlflow.pyfunc.load_model(URI)`` (MLflow's own loading, e.g. ``mlflow models serve``)
  executes the model's copy of this file. Use it only on stores whose writers you trust, as for
  any Python source you run.

``predict`` takes either of:

* one volume ``(4, X, Y, Z)`` float32 (or a batch of one) with the modalities in
  ``tumorseg.data.case.MODALITIES`` order, raw intensities, in the BraTS voxel layout (LPS,
  1 mm: the arrays of BraTS NIfTI files). This is the logged signature, so it is what
  ``mlflow.pyfunc.load_model(URI).predict(volume)`` and ``mlflow models serve`` accept;
* a case path, or a list of them: a BraTS case folder (2020/2021 naming ``ID/ID_flair.nii.gz``
  ..., or 2023+ naming ``ID/ID-t2f.nii.gz`` ...) or an MSD 4D image, read by the project's own
  readers (``tumorseg.data.readers.read_any``, as ``tumorseg-predict --input`` reads them), so
  the orientation and voxel spacing come from the NIfTI affine and are replayed by
  ``tumorseg.inference.predict`` like any other case.

Either way the result is canonical labels ``(X, Y, Z)`` uint8 (0 bg, 1 NCR, 2 ED, 3 ET) on the
case's own grid: one array for a volume or a path, a list of arrays (in input order) for a list
of paths. Params: ``tta`` (bool), ``min_et_voxels`` (int).

A path cannot go through the pyfunc wrapper's ``predict``: MLflow enforces the logged tensor
signature first, and a string fails it (``MlflowException``, "tensor-based model signature ...
but an input of type <class 'str'> was found"); a signature cannot be both a tensor and a
string column, and a ``params`` entry naming the case would still need a dummy volume to pass
it. The path route is the model object itself, which the wrapper hands out::

    model = mlflow.pyfunc.load_model("models:/tumorseg-unet@champion")
    labels = model.unwrap_python_model().predict("BraTS20_Training_001")
    per_case = model.unwrap_python_model().predict(["case_a", "case_b"], params={"tta": True})

Bad input raises the readers' ``DataError``, whose one-line message names the file.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np

CHECKPOINT = (
    "checkpoint"  # the model artifact holding the weights (as in tumorseg.tracking.registry)
)


class TumorsegModel(mlflow.pyfunc.PythonModel):
    """Segments a 4-channel volume, or case paths, with the checkpoint artifact
    ``checkpoint``."""

    _skip_type_hint_validation = True  # the logged signature is the schema, not type hints

    def load_context(self, context) -> None:
        from tumorseg.inference.predict import load_for_inference

        self.module = load_for_inference(context.artifacts[CHECKPOINT], "auto")

    def predict(self, model_input, params=None):
        """Canonical labels of a volume or of a case path; a list of them for a list of
        paths (see the module docstring)."""
        params = params or {}
        options = {
            "tta": bool(params.get("tta", False)),
            "min_et_voxels": int(params.get("min_et_voxels", 0)),
        }
        if is_path(model_input):
            return self.segment(read_input_path(model_input), **options)
        if isinstance(model_input, list | tuple) and model_input and all(map(is_path, model_input)):
            return [self.segment(read_input_path(path), **options) for path in model_input]
        return self.segment(volume_case(model_input), **options)

    def segment(self, case, tta: bool = False, min_et_voxels: int = 0) -> np.ndarray:
        from tumorseg.inference.predict import predict_case

        return predict_case(self.module, case, tta=tta, min_et_voxels=min_et_voxels)


def is_path(value) -> bool:
    return isinstance(value, str | os.PathLike)


def read_input_path(path):
    """A case folder or an MSD image, read as ``tumorseg-predict --input`` reads it (its
    segmentation, if any, is not read)."""
    from tumorseg.data.readers import read_any

    return read_any(path, labelled=False)


def volume_case(model_input):
    """A ``(4, X, Y, Z)`` volume (or a batch of one) in the BraTS voxel layout as a case."""
    from tumorseg.data.case import BRATS_AFFINE, Case

    image = np.asarray(model_input, dtype=np.float32)
    if image.ndim == 5 and image.shape[0] == 1:  # a batch of one
        image = image[0]
    if image.ndim != 4 or image.shape[0] != 4:
        raise ValueError(f"expected one volume (4, X, Y, Z), got shape {image.shape}")
    return Case("input", image, None, BRATS_AFFINE)


mlflow.models.set_model(TumorsegModel())
