"""MLflow: where runs go, what each run is tagged with, how its config becomes params."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger


def default_tracking_uri(mlruns_dir: str | Path) -> str:
    """SQLite store inside ``mlruns_dir`` (MLflow 3 refuses a plain file store by default)."""
    return f"sqlite:///{Path(mlruns_dir).resolve() / 'mlflow.db'}"


def make_mlflow_logger(
    experiment_name: str,
    mlruns_dir: str,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> MLFlowLogger:
    """MLFlowLogger for ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlruns_dir``.

    With the local default, artifacts are written to ``mlruns_dir/artifacts``.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(mlruns_dir)
    artifacts = None
    if uri.startswith("sqlite:") and not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        Path(mlruns_dir).mkdir(parents=True, exist_ok=True)
        artifacts = (Path(mlruns_dir).resolve() / "artifacts").as_uri()
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
