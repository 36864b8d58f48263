"""Records a run in MLflow: params, config, data sets, kept checkpoint, preview PNG, system
metrics."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from tumorseg.core.labels import labels_from_regions
from tumorseg.core.timing import active, phase
from tumorseg.tracking.client import compared_params, dataset_inputs, varied_keys

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)
COLOURS = np.array([[0, 0, 0, 0], [1, 0.2, 0.2, 0.6], [0.2, 0.9, 0.2, 0.45], [1, 0.9, 0, 0.7]])


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


@contextmanager
def _warnings_only(name: str) -> Iterator[None]:
    """Logger ``name`` passes warnings and errors only, inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def preview_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: list[str]):
    """Rows of FLAIR, truth and prediction (NCR red, ED green, ET yellow), radiological view."""
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        flair = image[row, 0].T
        for col, (title, lab) in enumerate(
            [("FLAIR", None), ("ground truth", truth), ("prediction", pred)]
        ):
            ax = axes[row, col]
            ax.imshow(flair, cmap="gray")
            if lab is not None:
                ax.imshow(COLOURS[lab[row].T])
            ax.set_title(f"{name} {title}" if col == 0 else title, fontsize=8)
            ax.axis("off")
        axes[row, 0].text(0, flair.shape[0] / 2, "R", color="w", fontsize=8)
    fig.tight_layout()
    return fig


def log_inputs(client, run_id: str, inputs: list, attempts: int = 5) -> None:
    """``client.log_inputs``, tried again when parallel jobs register the same data set in the
    same experiment at the same moment (the store's unique constraint refuses the second
    insert; on the next try the data set exists and is reused)."""

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if "UNIQUE constraint" not in str(err) and "duplicate key" not in str(err):
                raise
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def declare_objectives(client: Any, run_id: str, names: Any) -> None:
    """Log each objective metric first, as NaN at step 0 ("not measured yet"; the measured
    values follow at later steps and are the latest). MLflow's compare view opens its
    parallel-coordinates plot on the first metric the ticked runs share, in the order each
    run first logged them: the objective, not the learning rate logged at the first epoch."""
    from mlflow.entities import Metric

    names = [names] if isinstance(names, str) else list(names or ["val/dice_mean"])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(n, float("nan"), now, 0) for n in names])


class MlflowArtifacts(L.Callback):
    """Logs the run's params, config YAML, data manifest and data set inputs (training, validation,
    test) at fit start; the kept checkpoint and a PNG of fixed validation slices (FLAIR, ground
    truth, prediction) at fit end."""

    def __init__(self, preview_slices: int = 4) -> None:
        self.preview_slices = preview_slices

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with phase("logging"):
            self._log_inputs(trainer, pl_module)

    def _log_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow(trainer)
        config = getattr(pl_module, "config", None)
        if logger is None or not config:
            return
        varied = varied_keys()
        logger.log_hyperparams(compared_params(config, varied))
        client, run_id = logger.experiment, logger.run_id
        if varied:  # a multirun: its runs are compared
            declare_objectives(client, run_id, config.get("optimized_metric"))
        client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        manifest = getattr(trainer.datamodule, "manifest", None)
        if manifest is not None:
            client.log_dict(run_id, manifest(), "data_manifest.json")
            log_inputs(client, run_id, dataset_inputs(manifest()))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with phase("logging"):
            self._log_outputs(trainer, pl_module)

    def _log_outputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow(trainer)
        if logger is None:
            return
        client, run_id = logger.experiment, logger.run_id
        kept = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if kept and Path(kept).exists():
            client.log_artifact(run_id, kept, "checkpoints")
        if self.preview_slices and hasattr(trainer.datamodule, "preview"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "val_preview.png"
                self._preview(trainer.datamodule, pl_module).savefig(path, dpi=80)
                plt.close("all")
                client.log_artifact(run_id, str(path))

    def _preview(self, datamodule, pl_module):
        image, labels, index = datamodule.preview(self.preview_slices)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(image.to(pl_module.device)).float()
        pl_module.train(was_training)
        pred = labels_from_regions(pl_module.predict_regions(logits)).cpu().numpy()
        names = [f"{cid} z={z}" for cid, z in index]
        return preview_figure(image.numpy(), labels.numpy(), pred, names)


class PhaseTimer(L.Callback):
    """The validation loops of a fit as phase ``validation`` of the run's recorder
    (``tumorseg.core.timing``): what is left of the fit is ``train``. Nothing outside a run."""

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        phases = active()
        if phases is not None and trainer.state.fn == "fit":
            phases.start("validation")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        phases = active()
        if phases is not None and trainer.state.fn == "fit":
            phases.stop("validation")


class SystemMetrics(L.Callback):
    """CPU, memory, disk and network use (and utilisation and memory of NVIDIA GPUs, through
    nvidia-ml-py) logged as ``system/*`` to the run's System metrics tab while it trains.

    MLflow's own monitor samples every ``sampling_interval`` seconds in a thread on rank 0 and
    logs the mean of ``samples_before_logging`` samples. ``callbacks.system_metrics=null`` turns
    it off.
    """

    def __init__(self, sampling_interval: float = 10.0, samples_before_logging: int = 1) -> None:
        self.sampling_interval = sampling_interval
        self.samples_before_logging = samples_before_logging
        self._monitor = None

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow(trainer)
        if logger is None or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with _warnings_only("mlflow.system_metrics"):  # no "skipping GPU metrics" on CPUs
            self._monitor = SystemMetricsMonitor(
                logger.run_id,
                sampling_interval=self.sampling_interval,
                samples_before_logging=self.samples_before_logging,
                resume_logging=bool(trainer.ckpt_path),  # a resumed run continues its steps
                tracking_uri=logger._tracking_uri,
            )
            self._monitor.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._monitor is not None:
            with _warnings_only("mlflow.system_metrics"):
                self._monitor.finish()
            self._monitor = None
