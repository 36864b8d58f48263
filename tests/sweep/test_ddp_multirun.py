"""Hydra multiruns whose jobs are DDP jobs (2 gloo processes each): every job gets its own
process group, no DDP child starts a sweep of its own, one MLflow run (and Optuna trial) per job."""

import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.multirun import DDP, fail_in_rank, mlflow_runs, multirun, optuna_storage, optuna_sweep
from tumorseg.sweep.launch import starts_children


def test_which_trainers_start_ranks_by_rerunning_the_command_line():
    assert starts_children({"strategy": "ddp", "accelerator": "cpu", "devices": 2})
    assert starts_children({"accelerator": "gpu", "devices": [0, 1]})  # strategy auto: ddp
    assert starts_children({"accelerator": "gpu", "devices": "auto"})  # maybe several GPUs
    assert not starts_children({"strategy": "ddp", "devices": 1})
    assert not starts_children({"strategy": "ddp_spawn", "devices": 2})  # multiprocessing
    assert not starts_children({"accelerator": "cpu", "devices": "auto"})  # one process


def check_processes(tmp_path: Path, stderr: str) -> list[Path]:
    """One sweep folder, no single-run folders, and per job one rank-0 and one rank-1 process
    that joined the same group; returns the job folders."""
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1, f"sweep folders: {sweeps}"  # a child re-running -m makes another
    assert not (tmp_path / "outputs" / "runs").exists()
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert len(jobs) == 2
    children = re.findall(r"DDP rank 1 of the job in (\S+)", stderr)
    assert sorted(children) == [str(j) for j in jobs]  # each job's child ran that job only
    assert stderr.count("GLOBAL_RANK: 0, MEMBER: 1/2") == 2
    assert stderr.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    return jobs


def training_runs(tmp_path: Path) -> list:
    runs = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("optuna_parent") != "true"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert "val/dice_mean" in r.data.metrics
        assert r.data.tags["devices"] == "cpu x2"
    return runs


@pytest.mark.slow
def test_plain_multirun_of_ddp_jobs(tmp_path, demo_root):
    res = multirun(tmp_path, demo_root, "model=unet,attention_unet", *DDP)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = check_processes(tmp_path, res.stderr)
    runs = training_runs(tmp_path)
    assert sorted(r.data.tags["variant"] for r in runs) == ["attention_unet", "unet"]
    assert sorted(r.data.tags["sweep_job"] for r in runs) == ["0", "1"]
    assert {r.data.tags["sweep"] for r in runs} == {str(jobs[0].parent)}


@pytest.mark.slow
def test_optuna_sweep_of_ddp_trials(tmp_path, demo_root):
    url = optuna_storage(tmp_path)
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "hydra.sweeper.n_trials=2",
        *DDP,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    check_processes(tmp_path, res.stderr)
    trials = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert [t.number for t in trials] == [0, 1]  # no child sampled trials of its own
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    runs = training_runs(tmp_path)
    assert [r.data.tags["optuna_trial"] for r in runs] == ["0", "1"]
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == [r.info.run_id for r in runs]


@pytest.mark.slow
def test_a_ddp_trial_whose_rank_fails_fails_alone(tmp_path, demo_root):
    """Rank 1 of trial 0 raises. Lightning then SIGKILLs the process that started the ranks:
    the trial's own, not the sweeper's, so trial 0 is FAIL, its run FAILED, and trial 1 runs."""
    url = optuna_storage(tmp_path)
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "hydra.sweeper.n_trials=2",
        *DDP,
        fail_in_rank(1, trials=[0]),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    runs = {r.data.tags.get("optuna_trial"): r for r in mlflow_runs(tmp_path)}
    runs.pop(None)  # the study's parent run
    assert sorted(runs) == ["0", "1"]
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["optuna_state"] == "FAIL"
    assert runs["1"].info.status == "FINISHED" and "val/dice_mean" in runs["1"].data.metrics
