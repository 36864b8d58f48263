"""`python train.py` as a user runs it: multirun, CPU DDP, read from MLflow (kill and resume:
test_resume.py)."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_train

pytestmark = pytest.mark.slow


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def runs_of(cwd: Path):
    client = client_for(cwd)
    exp = client.get_experiment_by_name("tumorseg")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_multirun_three_variants_logged_to_mlflow(tmp_path, demo_root):
    res = run_train(
        tmp_path,
        "-m",
        "model=unet,attention_unet,residual_unet",
        "debug=tiny",
        f"data.root={demo_root}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    client, runs = runs_of(tmp_path)
    assert [r.data.tags["variant"] for r in runs] == ["unet", "attention_unet", "residual_unet"]
    sweeps = {r.data.tags["sweep"] for r in runs}
    assert len(sweeps) == 1
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["model.name"] == r.data.tags["variant"]
        assert r.data.params["data.image_size"] == "64"
        assert r.data.tags["data_source"] == "demo" and len(r.data.tags["data_manifest"]) == 16
        assert r.data.tags["git_commit"] and r.data.tags["seed"] == "42"
        for key in (
            "val/dice_wt",
            "val/dice_tc",
            "val/dice_et",
            "val/dice_mean",
            "val/iou_wt",
            "val/acc_et",
            "test/dice_mean",
            "train/loss",
        ):
            assert 0.0 <= r.data.metrics[key] <= (1.0 if "loss" not in key else 10.0), key
        assert len(client.get_metric_history(r.info.run_id, "val/dice_mean")) == 2
        files = artifact_paths(client, r.info.run_id)
        assert {"config.yaml", "data_manifest.json", "val_preview.png"} <= files
        assert {"evaluation/test_cases.csv", "evaluation/test_cases_summary.csv"} <= files
        assert any(f.startswith("evaluation/overlays/") for f in files)
        assert any(f.startswith("checkpoints/epoch_") and f.endswith(".ckpt") for f in files)


def test_ddp_two_cpu_processes(tmp_path, demo_root):
    res = run_train(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "debug=tiny",
        f"data.root={demo_root}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out and "gloo" in out
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1  # rank 1 logs nothing of its own
    run = runs[0]
    assert run.data.params["trainer.strategy"] == "ddp"
    history = client.get_metric_history(run.info.run_id, "val/dice_mean")
    assert len(history) == 2  # once per epoch, not once per rank


def test_bad_data_dir_is_one_line_error(tmp_path):
    res = run_train(tmp_path, "data.source=brats", f"data.root={tmp_path / 'nope'}")
    assert res.returncode == 2
    assert (
        res.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path / 'nope'}: data directory does not exist"
    )
    assert "Traceback" not in res.stderr
