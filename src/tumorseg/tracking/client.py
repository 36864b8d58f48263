"""MLflow: where runs go, what each run is tagged with, how its config becomes params."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tumorseg.core.errors import DataError

if TYPE_CHECKING:  # Lightning takes seconds to import; the command-line tools need none of it
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"  # what a plain ``mlflow ui`` opens in its working directory
ARTIFACTS_DIR = "mlartifacts"  # where ``mlflow ui`` itself keeps artifacts by default
UI_URL = "http://127.0.0.1:5000"  # ``mlflow ui`` with its default host and port
# The experiment tag MLflow 3 keeps for "what is this experiment for"; the UI's switch between
# its GenAI and model-training views is chosen per browser (``workflowType`` in the URL, else
# remembered in the browser), so links printed by the project carry it too.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUNS_VIEW = "workflowType=machine_learning"


def project_root() -> Path:
    """``$TUMORSEG_ROOT``; else the tumorseg checkout holding the working directory (a folder
    with ``conf/train.yaml`` and ``pyproject.toml``, the working directory or above it); else the
    working directory. Data, outputs and the MLflow store live under it."""
    if os.environ.get("TUMORSEG_ROOT"):
        return Path(os.environ["TUMORSEG_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "conf" / "train.yaml").is_file() and (folder / "pyproject.toml").is_file():
            return folder
    return cwd


def local_store_uri(root: str | Path | None = None) -> str:
    """``sqlite:///<root>/mlflow.db``: the store ``mlflow ui`` opens when started in ``root``."""
    return f"sqlite:///{Path(root or project_root()).resolve() / STORE_FILE}"


def default_tracking_uri(root: str | Path | None = None) -> str:
    """The tracking URI every tool uses unless told otherwise: ``$MLFLOW_TRACKING_URI``, else the
    SQLite store in the project root (``root`` overrides the root, as ``paths.root_dir`` does)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(root)


def tracking_uri(given: str | None) -> str:
    """A ``--tracking-uri`` value, else ``default_tracking_uri()``: the one rule of
    ``tumorseg-evaluate`` and ``tumorseg-report``."""
    return given or default_tracking_uri()


def tracking_target(
    tracking_uri: str | None = None, root: str | Path | None = None
) -> tuple[str, str | None]:
    """Tracking URI and, for the local store, the artifact location of new experiments.

    ``tracking_uri`` wins, then ``$MLFLOW_TRACKING_URI`` (artifacts: the server's default), then
    ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts``.
    """
    explicit = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit, None
    root = Path(root or project_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    old = root / "mlruns" / STORE_FILE
    if old.is_file() and not (root / STORE_FILE).exists():
        log.warning(
            "earlier runs are in %s; `mv %s %s` keeps them in the store `mlflow ui` opens",
            old,
            old,
            root / STORE_FILE,
        )
    return local_store_uri(root), (root / ARTIFACTS_DIR).as_uri()


def require_store(tracking_uri: str) -> None:
    """DataError naming ``tracking_uri`` when it is a SQLite store whose file does not exist:
    opening it would create an empty store, so tools that only read refuse it instead."""
    from tumorseg.core.errors import DataError

    if not tracking_uri.startswith("sqlite:///"):
        return
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if path in ("", ":memory:"):
        return
    if not Path(path).is_file():
        raise DataError(f"MLflow store {tracking_uri} does not exist")


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """Id of experiment ``name``; created when missing (tagged as a model-training experiment).

    Another process may create it at the same moment; then that one is used.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags=EXPERIMENT_KIND
        )
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI for ``tracking_uri`` is: the server itself, else ``mlflow ui``'s
    default address."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return UI_URL


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI (model-training view)."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{RUNS_VIEW}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    base = ui_base(tracking_uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{RUNS_VIEW}"


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a local store in the UI at :data:`UI_URL` (None for a server)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    if store.name == STORE_FILE and store.parent == Path.cwd().resolve():
        return "mlflow ui"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def run_link(logger: MLFlowLogger) -> str:
    """One line: run id, experiment and the URL of the run's page (and how to serve it)."""
    uri = logger._tracking_uri
    line = f"MLflow run {logger.run_id} in experiment {logger._experiment_name!r}: " + run_url(
        uri, logger.experiment_id, logger.run_id
    )
    command = ui_command(uri)
    return f"{line} (serve it with `{command}`)" if command else line


def make_mlflow_logger(
    experiment_name: str,
    root_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> MLFlowLogger:
    """MLFlowLogger for ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the local store
    ``<root_dir>/mlflow.db`` (artifacts in ``<root_dir>/mlartifacts``).

    On rank 0 the experiment is created here when missing, tagged as model development.
    """
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.utilities import rank_zero_only

    uri, artifacts = tracking_target(tracking_uri, root_dir)
    if rank_zero_only.rank == 0:
        from mlflow import MlflowClient

        ensure_experiment(MlflowClient(uri), experiment_name, artifacts)
    return MLFlowLogger(
        experiment_name=experiment_name,
        tracking_uri=uri,
        run_name=run_name,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        artifact_location=artifacts,
    )


def git_commit(cwd: str | Path = ".") -> str:
    """Current commit hash (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"model.net.features": "[16, 32]", ...}`` for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# What runs are compared on, as MLflow params: MLflow's compare view opens its parallel-
# coordinates plot on the first three params (sorted) whose values differ between the ticked
# runs, so run-specific values (paths, checkpoint folders) must not be params. The full
# resolved config stays the run's config.yaml artifact.
COMPARED = (
    "model.",  # every model hyper-parameter (``_partial_`` flags and targets aside)
    "data.source",
    "data.demo_cases",
    "data.demo_difficulty",
    "data.image_size",
    "data.batch_size",
    "data.augment",
    "data.flip",
    "data.foreground_ratio",
    "data.skip_empty",
    "data.fold",
    "data.crop",
    "trainer.max_epochs",
    "trainer.precision",
    "trainer.strategy",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "seed",
    "optimized_metric",
)


def compared_params(config: dict[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """The params a user compares runs on: the ``COMPARED`` keys of the flattened config, and
    ``extra`` keys (a sweep's searched keys, a multirun's overridden ones) where the config
    has them. ``model.net._target_`` is kept (it names the net); other targets are not."""
    prefixes = tuple(w if w.endswith(".") else f"{w}." for w in (*COMPARED, *extra))
    exact = {w for w in (*COMPARED, *extra) if not w.endswith(".")}

    def keep(key: str) -> bool:
        if key.endswith(("._partial_", "._target_")) and key != "model.net._target_":
            return False
        return key in exact or key.startswith(prefixes)

    return {k: v for k, v in flatten(config).items() if keep(k)}


def varied_keys() -> list[str]:
    """Config keys a multirun varies in this job: the sweeper's searched ``params`` and the
    job's command-line overrides (groups and paths aside); empty outside a multirun."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    if getattr(hc.mode, "name", "") != "MULTIRUN":
        return []
    keys = list((hc.sweeper.get("params") or {}).keys())
    for override in hc.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" in override and not key.startswith(("hydra", "paths", "logger", "data.root")):
            keys.append(key)
    return keys


CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # split -> MLflow context


def split_digest(store_hash: str, case_ids: list[str]) -> str:
    """16 hex digits naming a split's data: the store's content hash and the split's case ids."""
    body = json.dumps({"store_hash": store_hash, "cases": sorted(case_ids)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def dataset_inputs(manifest: dict[str, Any]) -> list[Any]:
    """MLflow dataset inputs for a data module's ``manifest()``: one per split, with context
    ``training``/``validation``/``test`` (empty splits are left out). Name: the data source;
    digest: :func:`split_digest`; source: the packed store; profile: the split's case count, its
    slices in the store, the store's options and hash, and the run's data manifest hash.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split, context in CONTEXTS.items():
        ids = manifest["split"].get(split) or []
        if not ids:
            continue
        profile = {
            "cases": len(ids),
            "store_slices": sum(manifest["cases"][c] for c in ids),
            "format": manifest.get("format"),
            "dtype": manifest.get("dtype"),
            "crop": manifest.get("crop"),
            "fold": manifest.get("fold"),
            "store_hash": manifest["store_hash"],
            "data_manifest": manifest["hash"],
        }
        dataset = Dataset(
            name=str(manifest["source"]),
            digest=split_digest(manifest["store_hash"], ids),
            source_type="local",
            source=json.dumps({"uri": str(manifest["store"])}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def run_client(run_id: str, uri: str) -> MlflowClient:
    """Client for ``uri`` after checking that ``run_id`` exists there (DataError if not)."""
    # imported here: mlflow is slow to import and only needed to log to a run
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    require_store(uri)  # a missing SQLite file would be created empty
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"MLflow run {run_id} at {uri}: {message}") from None
    return client
