"""`python train.py` as a user runs it: multirun, CPU DDP, read from MLflow (kill and resume:
test_resume.py)."""

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
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
        m = r.data.metrics
        val_dice = [m[f"val/dice_{region}"] for region in ("wt", "tc", "et")]
        assert m["val/dice_mean"] == pytest.approx(np.mean(val_dice))
        # pooled over the same pixels, IoU = Dice / (2 - Dice)
        assert m["val/iou_wt"] == pytest.approx(m["val/dice_wt"] / (2 - m["val/dice_wt"]))
        assert 0.0 <= m["val/acc_et"] <= 1.0 and 0.0 < m["train/loss"] < 10.0
        cases = pd.read_csv(
            mlflow.artifacts.download_artifacts(
                run_id=r.info.run_id,
                artifact_path="evaluation/test_cases.csv",
                tracking_uri=client.tracking_uri,
                dst_path=str(tmp_path / "download" / r.info.run_id),
            )
        )  # test/dice_mean recomputed from the per-case table: mean over cases, then regions
        per_region = cases[cases["region"].isin(["wt", "tc", "et"])].groupby("region")["dice"]
        assert m["test/dice_mean"] == pytest.approx(per_region.mean().mean())
        history = client.get_metric_history(r.info.run_id, "val/dice_mean")
        first, *measured = sorted(history, key=lambda h: (h.step, h.timestamp))
        assert first.step == 0 and math.isnan(first.value)  # a multirun declares it first
        assert [h.value for h in measured if math.isnan(h.value)] == [] and len(measured) == 2
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
