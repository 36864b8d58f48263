"""Training through the composed Hydra config, in process."""

from typing import ClassVar

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import FAST_DEV_RUN, compose_tiny, val_dice_of
from tumorseg.train import run
from tumorseg.training.module import load_checkpoint
from tumorseg.training.precision import auto_precision


def assert_tiny(cfg, demo_root) -> None:
    """The composed config is the tiny one, on the shared 4-case demo."""
    assert cfg.data.demo_cases == 4 and cfg.data.image_size == 64
    assert list(cfg.model.net.features) == [8, 16, 32]
    assert cfg.data.root == str(demo_root)


class CountBatches(Callback):
    """Records what the trainer of a run did: batches per stage, loggers, callbacks."""

    seen: ClassVar[dict] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        CountBatches.seen.clear()
        CountBatches.seen.update(
            train=0,
            val=0,
            accelerator=type(trainer.accelerator).__name__,
            loggers=len(trainer.loggers),
            callbacks={type(c).__name__ for c in trainer.callbacks},
        )

    def on_train_batch_end(self, *args) -> None:
        CountBatches.seen["train"] += 1

    def on_validation_batch_end(self, *args) -> None:
        CountBatches.seen["val"] += 1


COUNT_BATCHES = f"+callbacks.count_batches._target_={__name__}.CountBatches"


def assert_one_batch_nothing_logged(tmp_path) -> None:
    seen = CountBatches.seen
    assert (seen["train"], seen["val"]) == (1, 1), seen
    assert seen["accelerator"] == "CPUAccelerator" and seen["loggers"] == 0, seen
    assert "LearningRateMonitor" not in seen["callbacks"], seen
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("variant", ["unet", "attention_unet", "residual_unet"])
def test_fast_dev_run_each_variant(variant, tmp_path, demo_root):
    cfg = compose_tiny(tmp_path, demo_root, [f"model={variant}", *FAST_DEV_RUN, COUNT_BATCHES])
    assert_tiny(cfg, demo_root)
    run(cfg)
    assert_one_batch_nothing_logged(tmp_path)
    assert sorted(p.name for p in demo_root.iterdir() if not p.name.startswith(".")) == [
        f"BraTS20_Training_00{i}" for i in range(1, 5)
    ]  # no cases added to the shared demo folder


def test_debug_default_runs_one_batch_and_logs_nothing(tmp_path, demo_root):
    """``debug=default`` (conf/debug/default.yaml) on the full train config, shrunk only in
    size: one train and one val batch on the CPU, no logger, no lr_monitor."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tumorseg.config import CONF_DIR

    tiny = ["data.demo_cases=4", "data.image_size=64", "data.batch_size=4"]
    tiny += ["data.val_fraction=0.25", "data.test_fraction=0.25", "data.min_brain_fraction=0.3"]
    tiny += ["model.net.features=[8,16,32]"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "debug=default",
                f"data.root={demo_root}",
                f"paths.root_dir={tmp_path}",
                *tiny,
                COUNT_BATCHES,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    run(cfg)
    assert_one_batch_nothing_logged(tmp_path)


def test_labels_mode_and_fp32(tmp_path, demo_root):
    cfg = compose_tiny(
        tmp_path, demo_root, ["model.target=labels", "trainer.precision=32-true", *FAST_DEV_RUN]
    )
    assert cfg.model.net.out_channels == 4
    assert_tiny(cfg, demo_root)
    run(cfg)


def test_compose_tiny_refuses_a_second_debug_choice(tmp_path, demo_root):
    with pytest.raises(ValueError, match="debug=tiny"):
        compose_tiny(tmp_path, demo_root, ["debug=default"])


def test_checkpoint_rebuilds_net_from_file_alone(tmp_path, demo_root):
    cfg = compose_tiny(tmp_path, demo_root, ["model=residual_unet", "trainer.max_epochs=1"])
    score = run(cfg)
    ckpt = next((tmp_path / "out" / "checkpoints").glob("epoch_*.ckpt"))
    assert score == pytest.approx(val_dice_of(cfg, ckpt), abs=1e-6)  # the kept epoch's
    module = load_checkpoint(ckpt)
    assert type(module.net).__name__ == "ResidualUNet"
    assert module.config["model"]["name"] == "residual_unet"
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        a, b = module(x), load_checkpoint(ckpt)(x)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert torch.equal(module.state_dict()["net.head.weight"], state["net.head.weight"])


def test_auto_precision_picks_bf16_on_bf16_cpu(monkeypatch):
    monkeypatch.setattr("tumorseg.training.precision.cpu_has_bf16", lambda: True)
    assert auto_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr("tumorseg.training.precision.cpu_has_bf16", lambda: False)
    assert auto_precision("cpu") == "32-true"


def test_run_that_fails_after_fit_is_failed_in_mlflow(tmp_path, demo_root, monkeypatch):
    """A crash in the test stage (or while logging the model) after fit leaves the MLflow run
    FAILED, not the FINISHED that Lightning set when fit ended."""
    from mlflow.tracking import MlflowClient

    import tumorseg.train as train

    def broken(*args, **kwargs):
        raise RuntimeError("test stage broke")

    monkeypatch.setattr(train, "run_test_stage", broken)
    cfg = compose_tiny(tmp_path, demo_root, ["trainer.max_epochs=1", "log_model=false"])
    with pytest.raises(RuntimeError, match="test stage broke"):
        run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


class SpoilLastEpoch(Callback):
    """Before the last epoch's validation, set the head to predict nothing (weight 0, bias
    -20): that epoch's validation Dice drops below the earlier epochs', so the last epoch is
    not the best one."""

    @torch.no_grad()
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            pl_module.net.head.weight.zero_()
            pl_module.net.head.bias.fill_(-20.0)


def test_run_keeps_the_final_weights(tmp_path, demo_root):
    """The model a run keeps (its MLflow checkpoint, what tumorseg-predict --run loads, the
    test stage's weights) holds the weights after the last epoch, and the score the run
    returns (a sweep's objective) is that epoch's validation Dice, not the best epoch's. The
    last epoch is made the worst, so keeping the best epoch cannot pass."""
    from mlflow.tracking import MlflowClient

    from tumorseg.tracking.registry import checkpoint_from_run

    spoil = f"+callbacks.spoil_last_epoch._target_={__name__}.SpoilLastEpoch"
    cfg = compose_tiny(tmp_path, demo_root, ["trainer.max_epochs=3", "test=false", spoil])
    score = run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(found.info.run_id, "val/dice_mean")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) == 3 and values[-1] < max(values[:-1]), values  # last is not the best
    assert score == pytest.approx(values[-1])
    kept = checkpoint_from_run(found.info.run_id, client.tracking_uri, tmp_path / "download")
    kept = torch.load(kept, weights_only=False)
    last = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    assert kept["epoch"] == last["epoch"] == 2
    assert torch.all(kept["state_dict"]["net.head.bias"] == -20.0)  # the spoiled head
    for name, tensor in last["state_dict"].items():
        assert torch.equal(kept["state_dict"][name], tensor), name
