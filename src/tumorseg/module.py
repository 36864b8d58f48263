"""LightningModule: a U-Net variant trained on BraTS slices, scored per region."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from tumorseg.data.preprocess import Preprocessing
from tumorseg.errors import DataError, first_line
from tumorseg.labels import regions_from_labels
from tumorseg.labels import target as target_of
from tumorseg.losses import LabelLoss, RegionLoss
from tumorseg.metrics import RegionMetrics


def out_channels(target: str) -> int:
    """Net output channels for a target mode: 3 sigmoid regions or 4 softmax labels."""
    return target_of(target).channels


class SegModule(L.LightningModule):
    """Segmentation module.

    Args:
        net: the network (injected by Hydra), logits ``(N, C, H, W)``.
        optimizer: partial taking the parameters.
        scheduler: optional partial taking the optimizer (stepped once per epoch).
        target: ``regions`` (WT/TC/ET sigmoid channels, BCE + Dice) or ``labels``
            (softmax over background/NCR/ED/ET, CE + Dice).
        dice_weight, ce_weight: loss weights.
        channels_last: run convolutions in channels-last memory format (faster on CPU and GPU).
        name: variant name, used as an MLflow tag.
    Batches are ``(image (N, 4, H, W) float, labels (N, H, W) uint8 canonical)``.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        target: str = "regions",
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        channels_last: bool = True,
        name: str = "unet",
    ) -> None:
        super().__init__()
        out_channels(target)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        loss_cls = RegionLoss if target == "regions" else LabelLoss
        self.loss = loss_cls(dice_weight=dice_weight, ce_weight=ce_weight)
        self.val_metrics, self.test_metrics = RegionMetrics(), RegionMetrics()
        self.config: dict | None = None  # resolved run config, stored in checkpoints
        self._preprocessing: Preprocessing | None = None  # recorded in checkpoints
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    @property
    def preprocessing(self) -> Preprocessing:
        """What turns a raw case into this net's input: the data module's, once training has
        a store; read back from the checkpoint; else derived from the config."""
        if self._preprocessing is None:
            trainer = self._trainer
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            if datamodule is not None and hasattr(datamodule, "preprocessing"):
                self._preprocessing = datamodule.preprocessing()
            else:
                return preprocessing_from_config(self.config)
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | None) -> None:
        self._preprocessing = value

    def predict_regions(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> boolean regions ``(N, 3, H, W)``."""
        return target_of(self.hparams.target).regions(logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.hparams.target == "regions":
            return self.loss(logits, regions_from_labels(labels))
        return self.loss(logits, labels)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        image, labels = batch
        loss = self._loss(self(image), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        image, labels = batch
        logits = self(image)
        self.log(f"{stage}/loss", self._loss(logits, labels), on_epoch=True, sync_dist=True)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(self.predict_regions(logits), regions_from_labels(labels))

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        values = metrics.compute()  # torchmetrics syncs the counts across ranks
        metrics.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()})

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    # trainer.test gives pooled slice metrics (test_slice/*); train.py's test stage is per case
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test_slice")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test_slice")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_fn(self.parameters())
        if self.scheduler_fn is None:
            return optimizer
        scheduler = self.scheduler_fn(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tumorseg_config"] = self.config
        checkpoint["tumorseg_preprocessing"] = self.preprocessing.to_dict()
        for logger in self.loggers:
            run_id = getattr(logger, "run_id", None)
            if run_id:
                checkpoint["mlflow_run_id"] = run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.config = checkpoint.get("tumorseg_config", self.config)
        if checkpoint.get("tumorseg_preprocessing"):
            self._preprocessing = Preprocessing.from_dict(checkpoint["tumorseg_preprocessing"])


def preprocessing_from_config(config: dict | None) -> Preprocessing:
    """The preprocessing of a run config, for checkpoints that predate its recording (BraTS
    orientation and 1 mm spacing; the crop, resize and slice filter of ``data``)."""
    data = (config or {}).get("data") or {}
    crop = data.get("crop")
    skip = data.get("skip_empty", "brain")
    skip = {True: "brain", False: "none", None: "none"}.get(skip, skip)
    return Preprocessing(
        crop=crop,
        slice_shape=(crop, crop) if crop else (240, 240),
        image_size=data.get("image_size"),
        skip_empty=skip,
        min_brain_fraction=data.get("min_brain_fraction", 0.02),
    )


class CheckpointError(DataError):
    """A checkpoint that cannot be loaded as plain data."""


# What a tumorseg checkpoint holds besides tensors, containers, numbers and strings.
SAFE_GLOBALS: tuple[Any, ...] = ()


# How torch.save files begin: a zip archive (torch >= 1.6), or the pickled magic number of the
# older format (protocol 2, the long 0x1950a86a20f9469cfc6c).
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


# How torch.load(weights_only=True) names an object it refuses to construct; any other error
# means the file's content is damaged.
OBJECT_REFUSED = (
    r"GLOBAL ([\w.]+)",
    r"Can only (?:create new object|build)[^<]*<class '([\w.]+)'>",
    r"unrecognized function ([\w.<>]+)",
)


def checkpoint_file_problem(path: str | Path) -> str | None:
    """Why the file cannot be a checkpoint written by ``torch.save`` (empty, neither a zip
    archive nor torch's pickle format, a zip archive cut short or without a pickle), or None."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if not head:
        return "empty file, not a PyTorch checkpoint"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "truncated checkpoint (a zip archive that ends early)"
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return f"not a PyTorch checkpoint (broken zip archive: {first_line(err)})"
        if not any(name.endswith("data.pkl") for name in names):
            return "not a PyTorch checkpoint (a zip archive without data.pkl)"
        return None
    if head.startswith(b"\x80"):
        if LEGACY_MAGIC.startswith(head):
            return None
        return "not a PyTorch checkpoint (a pickle that torch.save did not write)"
    return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False
) -> dict[str, Any]:
    """The checkpoint dict, read as data only (``torch.load(weights_only=True)``).

    A file that is no readable checkpoint (not written by ``torch.save``, truncated, corrupt)
    raises a ``CheckpointError`` saying so. A file holding any other object than plain data
    (which unpickling would construct, running its code) is refused with a ``CheckpointError``
    naming the type, unless ``trust``.
    """
    import pickle

    problem = checkpoint_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    # Errors torch.load raises for a file whose content is damaged.
    damaged = (pickle.UnpicklingError, EOFError, IndexError, KeyError, RuntimeError, ValueError)
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except damaged as err:
        text = str(err)
        found = next(filter(None, (re.search(p, text) for p in OBJECT_REFUSED)), None)
        if found and not trust:
            raise CheckpointError(
                f"{path}: checkpoint holds a {found.group(1)} object, which loading would run as "
                "code; refused (pass --trust-checkpoint only for a file from a source you trust)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        detail = detail.group(1).strip() if detail else first_line(err)
        if isinstance(err, EOFError) or "truncated" in text:
            raise CheckpointError(f"{path}: truncated checkpoint ({detail})") from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, corrupt or truncated ({detail})"
        ) from None


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False
) -> SegModule:
    """Rebuild module and net from a checkpoint file alone (its stored config), with weights."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ckpt = read_checkpoint(path, map_location, trust)
    config = ckpt.get("tumorseg_config")
    if not config:
        raise ValueError(f"{path}: checkpoint holds no tumorseg config")
    module: SegModule = instantiate(OmegaConf.create(config["model"]))
    module.load_state_dict(ckpt["state_dict"])
    module.config = config
    module.on_load_checkpoint(ckpt)
    return module.eval()
