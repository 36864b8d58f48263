"""Tracking: the MLflow tracking URI, experiments and links (:mod:`.client`), the training
callbacks that log to it (:mod:`.callbacks`), the model registry (:mod:`.registry`) and the
logged MLflow model (:mod:`.mlflow_model`).

May import ``tumorseg.evaluation`` and the packages below it.
"""
