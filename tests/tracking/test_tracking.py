"""What MLflow records and where: the store a plain ``mlflow ui`` opens, model-training
experiments, dataset inputs per split, system metrics, and a console without adverts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

from tests.conftest import compose_tiny
from tumorseg.core.console import quiet
from tumorseg.data import demo
from tumorseg.tracking import client as tracking
from tumorseg.tracking.callbacks import SystemMetrics


def sqlite_file(uri: str) -> Path:
    assert uri.startswith("sqlite:///"), uri
    return Path(uri.removeprefix("sqlite:///")).resolve()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("TUMORSEG_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return monkeypatch


def test_default_store_is_the_one_plain_mlflow_ui_opens(tmp_path, no_env):
    checkout = tmp_path / "checkout"
    (checkout / "conf").mkdir(parents=True)
    (checkout / "conf" / "train.yaml").write_text("defaults: []\n")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'tumorseg'\n")
    (checkout / "mlruns").mkdir()
    (checkout / "mlruns" / "optuna.db").write_bytes(b"")  # studies live there; not a file store

    no_env.chdir(checkout)
    ui_default = sqlite_file(_get_default_tracking_uri())  # what `mlflow ui` opens here
    assert sqlite_file(tracking.default_tracking_uri()) == ui_default

    # from anywhere inside the checkout, the same store
    deep = checkout / "experiments" / "study"
    deep.mkdir(parents=True)
    no_env.chdir(deep)
    assert tracking.project_root() == checkout.resolve()
    assert sqlite_file(tracking.default_tracking_uri()) == ui_default

    # outside a checkout: the working directory; TUMORSEG_ROOT and MLFLOW_TRACKING_URI win
    no_env.chdir(tmp_path)
    assert tracking.project_root() == tmp_path.resolve()
    no_env.setenv("TUMORSEG_ROOT", str(checkout))
    no_env.chdir(deep.parent)
    assert sqlite_file(tracking.default_tracking_uri()) == ui_default
    no_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.default_tracking_uri() == "http://127.0.0.1:5999"


def test_new_experiments_are_model_training_and_links_open_that_view(tmp_path, no_env):
    logger = tracking.make_mlflow_logger("kinds", root_dir=tmp_path, run_name="unet")
    client = MlflowClient(tracking.local_store_uri(tmp_path))
    exp = client.get_experiment_by_name("kinds")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()

    line = tracking.run_link(logger)
    url = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{logger.run_id}"
    assert f"MLflow run {logger.run_id} in experiment 'kinds': {url}" in line
    assert "workflowType=machine_learning" in line  # MLflow 3 opens its GenAI view otherwise
    assert f"--backend-store-uri {tracking.local_store_uri(tmp_path)}" in line

    remote = tracking.runs_url("http://mlflow.example:5000/", "7")
    assert remote == "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"


def contexts(run) -> dict[str, dict]:
    """Dataset inputs of ``run`` by context."""
    out = {}
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        out[tags["mlflow.data.context"]] = {
            "name": item.dataset.name,
            "digest": item.dataset.digest,
            "source": json.loads(item.dataset.source),
            "profile": json.loads(item.dataset.profile),
        }
    return out


def test_each_split_is_a_dataset_input(tmp_path, demo_root):
    manifests = []
    for seed in (0, 0, 1):
        cfg = compose_tiny(tmp_path, demo_root, [f"data.split_seed={seed}"])
        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.prepare_data()
        manifests.append(datamodule.manifest())
    client = MlflowClient(tracking.local_store_uri(tmp_path))
    exp = client.create_experiment("data")
    runs = []
    for manifest in manifests:
        run_id = client.create_run(exp).info.run_id
        client.log_inputs(run_id, datasets=tracking.dataset_inputs(manifest))
        runs.append(contexts(client.get_run(run_id)))

    first = runs[0]
    assert sorted(first) == ["test", "training", "validation"]
    split = dict(zip(("training", "validation", "test"), ("train", "val", "test"), strict=True))
    for context, data in first.items():
        ids = manifests[0]["split"][split[context]]
        assert data["name"] == "demo"
        assert data["source"]["uri"] == manifests[0]["store"]
        assert data["profile"]["cases"] == len(ids)
        assert data["profile"]["store_slices"] == sum(manifests[0]["cases"][c] for c in ids)
        assert data["profile"]["data_manifest"] == manifests[0]["hash"]
    assert len({d["digest"] for d in first.values()}) == 3
    # the same data, the same digests; another patient split, other digests
    assert {c: d["digest"] for c, d in runs[1].items()} == {
        c: d["digest"] for c, d in first.items()
    }
    assert runs[2]["training"]["digest"] != first["training"]["digest"]


class Busy(L.LightningModule):
    """A linear layer fitted for about two seconds: long enough for several samples."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(0.1)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(20, 8), torch.randn(20, 1))
        return torch.utils.data.DataLoader(data, batch_size=1)


def fit_logged(tmp_path: Path, callbacks: list) -> tuple[MlflowClient, str]:
    logger = tracking.make_mlflow_logger("system", root_dir=tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(Busy())
    return MlflowClient(tracking.local_store_uri(tmp_path)), logger.run_id


def test_system_metrics_reach_the_run_and_switch_off(tmp_path, no_env):
    client, run_id = fit_logged(tmp_path / "on", [SystemMetrics(sampling_interval=0.2)])
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 * 64 for m in cpu)
    assert memory and memory[-1].value > 0

    # the switch: the default config has the callback; `callbacks.system_metrics=null` drops it
    cfg = compose_tiny(tmp_path, tmp_path, [])
    assert cfg.callbacks.system_metrics._target_ == "tumorseg.tracking.callbacks.SystemMetrics"
    off = compose_tiny(tmp_path, tmp_path, ["callbacks.system_metrics=null"])
    built = [hydra.utils.instantiate(c) for c in off.callbacks.values() if c]  # as train.py
    assert built and not any(isinstance(c, SystemMetrics) for c in built)


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_console_has_no_adverts():
    from lightning.pytorch.utilities import rank_zero_info
    from lightning_utilities.core import rank_zero

    quiet()
    quiet()  # idempotent
    kept = Kept()
    rank_zero.log.addHandler(kept)  # where Lightning's rank-zero messages go
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing another service")
        rank_zero_info("GPU available: False, used: False")
    finally:
        rank_zero.log.removeHandler(kept)
    assert kept.messages == ["GPU available: False, used: False"]


def test_complete_demo_folder_shows_no_progress_bar(demo_root, capsys):
    demo.write_demo(demo_root, cases=4, seed=0, progress=True)  # all four cases exist
    captured = capsys.readouterr()
    assert "Synthesising" not in captured.out + captured.err


def test_demo_data_is_checked_once_per_process(tmp_path, demo_root, monkeypatch):
    calls = []
    real = demo.write_demo

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "write_demo", counted)
    cfg = compose_tiny(tmp_path, demo_root)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # train.py, for the manifest the run is tagged with
    datamodule.prepare_data()  # Trainer.fit
    assert len(calls) == 1
