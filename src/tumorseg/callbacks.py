"""Records a run in MLflow: params, config, data manifest, best checkpoint, preview PNG."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import torch
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from tumorseg.labels import labels_from_regions
from tumorseg.tracking import flatten

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)
COLOURS = np.array([[0, 0, 0, 0], [1, 0.2, 0.2, 0.6], [0.2, 0.9, 0.2, 0.45], [1, 0.9, 0, 0.7]])


def _mlflow(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


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


class MlflowArtifacts(L.Callback):
    """Logs the run's params, config YAML and data manifest at fit start; the best checkpoint and a
    PNG of fixed validation slices (FLAIR, ground truth, prediction) at fit end."""

    def __init__(self, preview_slices: int = 4) -> None:
        self.preview_slices = preview_slices

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow(trainer)
        config = getattr(pl_module, "config", None)
        if logger is None or not config:
            return
        logger.log_hyperparams(flatten(config))
        client, run_id = logger.experiment, logger.run_id
        client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        manifest = getattr(trainer.datamodule, "manifest", None)
        if manifest is not None:
            client.log_dict(run_id, manifest(), "data_manifest.json")

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow(trainer)
        if logger is None:
            return
        client, run_id = logger.experiment, logger.run_id
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best and Path(best).exists():
            client.log_artifact(run_id, best, "checkpoints")
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
