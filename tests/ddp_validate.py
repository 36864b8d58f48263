"""Validate an untrained, seeded tiny net on the demo with N CPU processes (gloo); rank 0
writes the pooled ``val/*`` metrics as JSON. Used by tests/training/test_ddp_validation.py:

    python tests/ddp_validate.py DEMO_ROOT WORK_DIR DEVICES OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir

from tumorseg.config import CONF_DIR


def main(demo_root: str, work: str, devices: int, out: str) -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["debug=tiny", f"data.root={demo_root}", f"paths.root_dir={work}"],
        )
    L.seed_everything(0)
    dm = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)  # same seed: same weights in every process
    with torch.no_grad():  # untrained nets predict nothing, and Dice 0 hides double counts:
        model.net.head.bias.fill_(1.0)  # call most pixels tumour instead
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
    )
    if trainer.is_global_zero:
        dm.prepare_data()
    trainer.validate(model, datamodule=dm, verbose=False)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["val_slices"] = len(dm.datasets["val"])
        Path(out).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
