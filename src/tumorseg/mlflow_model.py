"""A trained checkpoint as an MLflow model (logged and resolved by ``tumorseg.registry``).

The model is an MLflow *model from code*: ``mlflow.pyfunc.log_model`` is given the path of this
file, which MLflow copies into the model folder and, on ``mlflow.pyfunc.load_model``, runs as
source (it imports the installed ``tumorseg`` package and calls ``mlflow.models.set_model``).
Nothing is cloudpickled. The weights are the run's best checkpoint, kept as the model artifact
``checkpoint`` and read by ``tumorseg.inference.load_for_inference`` as data
(``torch.load(weights_only=True)``), so the model predicts through the project's own inference
(the checkpoint's recorded preprocessing, replayed).

What is trusted where:

* ``tumorseg-predict --model URI`` (``tumorseg.registry.checkpoint_from_model``) downloads the
  model folder, reads its ``MLmodel`` file as YAML (``yaml.safe_load``) to find the checkpoint,
  and loads the checkpoint as data. No code from the store is run: the copied source file is not
  executed, and this module is not imported.
* ``mlflow.pyfunc.load_model(URI)`` (MLflow's own loading, e.g. ``mlflow models serve``)
  executes the model's copy of this file. Use it only on stores whose writers you trust, as for
  any Python source you run.

The pyfunc input is one volume ``(4, X, Y, Z)`` float32 with the modalities in
``tumorseg.data.nifti.MODALITIES`` order, raw intensities, in the BraTS voxel layout (LPS, 1 mm:
the arrays of BraTS NIfTI files); the output is canonical labels ``(X, Y, Z)`` uint8 (0 bg,
1 NCR, 2 ED, 3 ET). Params: ``tta`` (bool), ``min_et_voxels`` (int).
"""

from __future__ import annotations

import mlflow
import numpy as np

CHECKPOINT = "checkpoint"  # the model artifact holding the weights (as in tumorseg.registry)


class TumorsegModel(mlflow.pyfunc.PythonModel):
    """Segments a 4-channel volume with the checkpoint artifact ``checkpoint``."""

    _skip_type_hint_validation = True  # the logged signature is the schema, not type hints

    def load_context(self, context) -> None:
        from tumorseg.inference import load_for_inference

        self.module = load_for_inference(context.artifacts[CHECKPOINT], "auto")

    def predict(self, context, model_input, params=None):
        from tumorseg.data.nifti import Case
        from tumorseg.data.readers import BRATS_AFFINE
        from tumorseg.inference import predict_case

        params = params or {}
        image = np.asarray(model_input, dtype=np.float32)
        if image.ndim == 5 and image.shape[0] == 1:  # a batch of one
            image = image[0]
        if image.ndim != 4 or image.shape[0] != 4:
            raise ValueError(f"expected one volume (4, X, Y, Z), got shape {image.shape}")
        case = Case("input", image, None, BRATS_AFFINE)
        return predict_case(
            self.module,
            case,
            tta=bool(params.get("tta", False)),
            min_et_voxels=int(params.get("min_et_voxels", 0)),
        )


mlflow.models.set_model(TumorsegModel())
