"""Inference: a trained net on a case as training saw it and back to the case's grid
(:mod:`.predict`), a folder of cases read, predicted and written in a pipeline (:mod:`.folder`),
overlay figures (:mod:`.overlay`) and export to ONNX and TorchScript (:mod:`.export`).

May import ``tumorseg.training``, ``tumorseg.data``, ``tumorseg.models`` and
``tumorseg.core``; never Lightning's trainer.
"""

# The MLflow models logged before the packages by stage import these two from here; remove
# after one release.
from tumorseg.inference.predict import load_for_inference, predict_case

__all__ = ["load_for_inference", "predict_case"]
