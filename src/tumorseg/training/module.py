"""LightningModule: a U-Net variant trained on BraTS slices, scored per region."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from tumorseg.core.labels import regions_from_labels
from tumorseg.core.labels import target as target_of
from tumorseg.data.preprocess import Preprocessing, preprocessing_from_config
from tumorseg.training.checkpoint import (  # noqa: F401  (their home before tumorseg.training.checkpoint)
    LEGACY_MAGIC,
    OBJECT_REFUSED,
    SAFE_GLOBALS,
    ZIP_MAGIC,
    CheckpointError,
    checkpoint_file_problem,
    plain_state_dict,
    read_checkpoint,
)
from tumorseg.training.losses import LabelLoss, RegionLoss
from tumorseg.training.scores import RegionMetrics

log = logging.getLogger(__name__)

# model.compile=auto compiles on the CPU only for fits of at least this many training steps:
# the break-even point, compile seconds / seconds saved per step, of the default U-Net (bf16
# autocast + channels-last, batch 16, 128x128) on the 2-core dev CPU. Measured with
# `TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m tumorseg.bench.compile --steps 40` at a
# 1-minute load of 2.7 (docs/benchmarks.md): compiling the training and eval graphs took 56.5 s
# (cold cache), and the median step went from 283 ms eager to 276 ms compiled (steps
# alternating): 6.2 ms saved per step, so 56.5 s pays back after ~9,100 steps. The default
# run (6 epochs x ~230 steps = ~1,400) stays eager. On CUDA, auto always compiles.
COMPILE_SECONDS_CPU = 56.5
COMPILE_GAIN_CPU = 0.0062
COMPILE_MIN_STEPS_CPU = 9100  # = COMPILE_SECONDS_CPU / COMPILE_GAIN_CPU, rounded


def compile_choice(value: bool | str) -> bool | str:
    """``model.compile`` as False, True or ``auto`` (also from the strings Hydra may pass)."""
    text = str(value).lower()
    if text in ("false", "0", "no", "off", "none"):
        return False
    if text in ("true", "1", "yes", "on"):
        return True
    if text == "auto":
        return "auto"
    raise ValueError(f"model.compile must be false, true or auto, got {value!r}")


def should_compile(choice: bool | str, device_type: str, steps: int | float) -> bool:
    """Whether a fit compiles the net: ``true`` always, ``false`` never; ``auto`` on CUDA, and
    on the CPU for fits of at least ``COMPILE_MIN_STEPS_CPU`` training steps (shorter ones
    would spend more on compiling than it saves)."""
    choice = compile_choice(choice)
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return True
    return device_type == "cpu" and steps >= COMPILE_MIN_STEPS_CPU > 0


class SegModule(L.LightningModule):
    """Segmentation module.

    Args:
        net: the network (injected by Hydra), logits ``(N, C, H, W)``.
        optimizer: partial taking the parameters.
        scheduler: optional partial taking the optimizer (stepped once per epoch).
        target: ``regions`` (WT/TC/ET sigmoid channels, BCE + Dice) or ``labels``
            (softmax over background/NCR/ED/ET, CE + Dice).
        dice_weight: weight of the Dice loss.
        ce_weight: weight of the BCE or CE loss.
        channels_last: run convolutions in channels-last memory format (faster on CPU and GPU).
        name: variant name, used as an MLflow tag.
        compile: ``torch.compile`` the net when a fit starts: ``false``, ``true`` or ``auto``
            (``should_compile``). The net is compiled in place (``nn.Module.compile``), so its
            parameters keep their names and checkpoints load without compiling.
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
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        target_of(target)  # a bad target fails here, naming the choices
        compile_choice(compile)
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
        """What turns a raw case into this net's input: as given (train.py gives the data
        module's, once it has a store), read back from the checkpoint, else derived from the
        config."""
        if self._preprocessing is None:
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

    def on_fit_start(self) -> None:
        """Compile the net as ``model.compile`` says, for the steps this fit has left."""
        trainer = self.trainer
        steps = trainer.estimated_stepping_batches - trainer.global_step
        if should_compile(self.hparams.compile, self.device.type, steps):
            log.info("torch.compile: the net (%s, %s training steps)", self.device.type, steps)
            self.net.compile()

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
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = plain_state_dict(checkpoint["state_dict"])
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
    module.load_state_dict(plain_state_dict(ckpt["state_dict"]))
    module.config = config
    module.on_load_checkpoint(ckpt)
    return module.eval()
