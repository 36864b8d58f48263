"""The MLflow side of trained models: logging a run's kept checkpoint as an MLflow model,
registering it, and finding a checkpoint again from a run id or a model URI.

The model itself is ``tumorseg/tracking/mlflow_model.py``, logged as an MLflow *model from code*;
see there for what it holds and what is trusted when it is loaded.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml

from tumorseg.core.errors import DataError, first_line
from tumorseg.tracking.client import require_store

log = logging.getLogger(__name__)

MODEL_FILE = Path(__file__).with_name("mlflow_model.py")  # the model from code
MODEL_NAME = "model"  # artifact name of the logged model: runs:/<run_id>/model
CHECKPOINT = "checkpoint"  # the model artifact holding the weights
CHECKPOINTS_DIR = "checkpoints"  # a training run's checkpoint artifacts
EXAMPLE_SHAPE = (4, 8, 8, 4)  # input example: small, so that logging stays quick


# ---------------------------------------------------------------- logging a model


def pin(name: str, version: str) -> str:
    """``name==version`` with the version's public part: a local label (``2.14.1+cu130``,
    ``2.13.0+cpu``) names a build of one package index and would not resolve from PyPI on
    another machine, so it is dropped."""
    from packaging.version import Version

    return f"{name}=={Version(version).public}"


def pinned_requirements() -> list[str]:
    """The project's dependencies (``tumorseg``'s core ``Requires-Dist``), each pinned to the
    installed version's public part (:func:`pin`)."""
    from packaging.requirements import Requirement

    pins = []
    for line in metadata.requires("tumorseg") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        try:
            pins.append(pin(req.name, metadata.version(req.name)))
        except metadata.PackageNotFoundError:
            pins.append(str(req))
    return pins


def signature() -> Any:
    """Tensor signature: one ``(4, X, Y, Z)`` float32 volume in, ``(X, Y, Z)`` uint8 out (case
    paths, which it cannot describe, go to the model object: ``tumorseg.tracking.mlflow_model``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (4, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema(
            [ParamSpec("tta", "boolean", False), ParamSpec("min_et_voxels", "long", 0)]
        ),
    )


def log_model(
    checkpoint: str | Path,
    run_id: str,
    tracking_uri: str,
    registered_model_name: str | None = None,
) -> Any:
    """Log ``checkpoint`` as the MLflow model ``model`` of run ``run_id`` (and register it as
    ``registered_model_name``); returns MLflow's ``ModelInfo``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with using(tracking_uri), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(MODEL_FILE),
            artifacts={CHECKPOINT: str(checkpoint)},
            signature=signature(),
            input_example=np.zeros(EXAMPLE_SHAPE, dtype=np.float32),
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_model_name,
            metadata={"tumorseg_checkpoint": Path(checkpoint).name},
        )


@contextmanager
def using(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``tracking_uri`` (and its registry) inside the block.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; both the fluent state and
    the environment are put back afterwards, so later tools in the process still find their
    own default store.
    """
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking_state._tracking_uri, registry_state._registry_uri
    env = {key: os.environ.get(key) for key in keys}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_state._tracking_uri, registry_state._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- the registry


def register_run(run_id: str, name: str, tracking_uri: str, alias: str | None = "champion") -> Any:
    """Register run ``run_id``'s model as a new version of ``name`` (with ``alias``); returns
    the ``ModelVersion``."""
    from mlflow import MlflowClient

    require_store(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    model_id = logged_model_id(client, run_id)
    with using(tracking_uri):
        version = mlflow.register_model(f"models:/{model_id}", name)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def logged_model_id(client: Any, run_id: str) -> str:
    """Id of the model ``model`` logged by run ``run_id``; DataError if it has none."""
    try:
        run = client.get_run(run_id)
    except Exception as err:  # MlflowException for unknown ids, others for bad stores
        raise DataError(f"run {run_id}: not found ({first_line(err)})") from None
    models = [m for m in run.outputs.model_outputs] if run.outputs else []
    if not models:
        found = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        )
        if found:
            return found[0].model_id
        raise DataError(f"run {run_id}: no logged model (was it trained with log_model=false?)")
    return models[-1].model_id


def study_best_run(parent_run_id: str, tracking_uri: str, trial: int | None = None) -> str:
    """Run id of trial ``trial`` of the study whose parent run is ``parent_run_id``; without
    ``trial``, of its best trial (the parent's ``best_trial`` tag, written when the study
    finished). A study of several objectives has a front of best trials (tag ``best_trials``):
    with more than one, ``trial`` must say which."""
    from mlflow import MlflowClient

    require_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as err:
        raise DataError(f"run {parent_run_id}: not found ({first_line(err)})") from None
    tags = parent.data.tags
    best = str(trial) if trial is not None else tags.get("best_trial")
    if best is None:
        front = [t for t in tags.get("best_trials", "").split(",") if t]
        if len(front) > 1:
            raise DataError(
                f"run {parent_run_id}: {len(front)} best trials ({', '.join(front)}, the Pareto "
                "front): give --trial N"
            )
        raise DataError(f"run {parent_run_id}: not a finished study's parent run (no best_trial)")
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.optuna_trial = '{best}' AND tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise DataError(f"run {parent_run_id}: the run of trial {best} is not in the store")
    return runs[0].info.run_id


# ---------------------------------------------------------------- checkpoints from URIs


def download(uri: str, tracking_uri: str, dst: Path) -> Path:
    """``uri`` (runs:/, models:/ or an artifact URI) downloaded into ``dst``; DataError naming
    it when it cannot be resolved."""
    try:
        with using(tracking_uri):  # runs:/ and models:/ resolve through the fluent API's store
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as err:  # MlflowException, OSError and others from artifact stores
        raise DataError(f"{uri}: cannot be resolved ({first_line(err)})") from None


def checkpoint_from_model(uri: str, tracking_uri: str, dst: Path) -> Path:
    """The checkpoint file of the MLflow model ``uri`` (``runs:/<id>/model``,
    ``models:/<name>@<alias>``, ``models:/<name>/<version>``), downloaded into ``dst``.

    Only the ``MLmodel`` file (YAML, read with ``safe_load``) and the checkpoint are used; the
    model's Python source is downloaded but never run.
    """
    if not uri.startswith(("runs:/", "models:/")):
        raise DataError(f"--model {uri}: expected runs:/<run_id>/model or models:/<name>@<alias>")
    require_store(tracking_uri)
    folder = download(uri, tracking_uri, dst)
    spec = folder / "MLmodel"
    if not spec.is_file():
        raise DataError(f"{uri}: not an MLflow model (no MLmodel file)")
    try:
        flavor = yaml.safe_load(spec.read_text())["flavors"]["python_function"]
        path = flavor["artifacts"][CHECKPOINT]["path"]
    except (KeyError, TypeError, yaml.YAMLError):
        raise DataError(f"{uri}: not a tumorseg model (no '{CHECKPOINT}' artifact)") from None
    ckpt = (folder / path).resolve()
    if folder.resolve() not in ckpt.parents or not ckpt.is_file():
        raise DataError(f"{uri}: checkpoint artifact {path} is missing")
    return ckpt


def checkpoint_from_run(run_id: str, tracking_uri: str, dst: Path) -> Path:
    """Run ``run_id``'s kept checkpoint (its ``checkpoints/`` artifact; ``last.ckpt`` only when
    it is the only one), downloaded into ``dst``."""
    from mlflow import MlflowClient

    require_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
        files = [f.path for f in client.list_artifacts(run_id, CHECKPOINTS_DIR) if not f.is_dir]
    except Exception as err:
        raise DataError(
            f"--run {run_id}: no such run in {tracking_uri} ({first_line(err)})"
        ) from None
    ckpts = sorted(f for f in files if f.endswith(".ckpt"))
    best = [f for f in ckpts if Path(f).name != "last.ckpt"] or ckpts
    if not best:
        raise DataError(f"--run {run_id}: the run has no checkpoint under {CHECKPOINTS_DIR}/")
    return download(f"runs:/{run_id}/{best[-1]}", tracking_uri, dst)


def resolve_checkpoint(
    checkpoint: Path | None, run: str | None, model: str | None, tracking_uri: str, dst: Path
) -> Path:
    """The checkpoint file named by exactly one of ``checkpoint`` (a file), ``run`` (a run id:
    the checkpoint it kept) or ``model`` (an MLflow model URI), downloaded into ``dst`` if
    needed."""
    if checkpoint is not None:
        return checkpoint
    if run is not None:
        return checkpoint_from_run(run, tracking_uri, dst)
    return checkpoint_from_model(model, tracking_uri, dst)


def temp_dir() -> tempfile.TemporaryDirectory:
    """Where downloaded models wait while they are loaded."""
    return tempfile.TemporaryDirectory(prefix="tumorseg-model-")
