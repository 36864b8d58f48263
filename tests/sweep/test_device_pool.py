"""The device pool of parallel sweeps: each running trial (or multirun job) on its own devices.

No GPU here: a list of device indices stands in for GPUs. Each job records, in its own process,
the ``CUDA_VISIBLE_DEVICES`` it started with (an MLflow tag resolved from the job's environment),
the ``devices`` tag and, for sweeps, the ``devices`` its trainer was given (a stand-in trainer
that trains on one CPU process); Optuna records when each trial was asked and told.
"""

from itertools import combinations
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.tumorseg_optuna_sweeper.config import OptunaSweeperConf
from tests.multirun import (
    STAND_IN_TRAINER,
    fail_in_rank,
    kill_in_trials,
    mlflow_runs,
    multirun,
    optuna_storage,
    optuna_sweep,
)
from tumorseg.sweep.pool import DevicePool, visible_devices
from tumorseg.sweep.study import StudySweep

# the job's own environment, read in the job's process when its config resolves
RECORD = "++tags.cuda_visible_devices=${oc.env:CUDA_VISIBLE_DEVICES,unset}"


def test_pool_hands_out_disjoint_sets_and_takes_them_back():
    pool = DevicePool(["0", "1", "2", "3", "4"], per_job=2)
    assert pool.slots == 2
    a, b = pool.acquire(), pool.acquire()
    assert (a, b) == (("0", "1"), ("2", "3"))
    assert not pool.available()  # one device left, two needed
    with pytest.raises(RuntimeError):
        pool.acquire()
    pool.release(a)
    assert pool.acquire() == ("0", "1")  # released devices are reused
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(["4"])
    with pytest.raises(Exception, match="3 devices per job, but the pool has 2"):
        DevicePool(["0", "1"], per_job=3)


def test_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_devices("auto") == ["2", "3"]  # what this process may use, as named
    assert visible_devices([0, 1, 5]) == ["0", "1", "5"]
    assert visible_devices("4,6") == ["4", "6"]
    assert visible_devices(None) == []
    with pytest.raises(Exception, match="twice"):
        visible_devices([1, 1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_devices("auto") == []


def test_auto_is_the_default_and_a_machine_without_gpus_gets_no_pool(monkeypatch):
    assert OptunaSweeperConf().devices == "auto"
    sweeper = StudySweep()  # what the sweeper runs, with its defaults
    assert sweeper.devices == "auto"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible
    sweeper.config = OmegaConf.create({"trainer": {"accelerator": "auto"}})
    assert sweeper.device_pool(basic=True) is None
    assert sweeper.jobs_at_once(None) == 1  # one trial at a time
    sweeper.n_jobs = 3
    assert sweeper.jobs_at_once(None) == 3  # unless n_jobs says otherwise
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    sweeper.n_jobs = None
    pool = sweeper.device_pool(basic=True)
    assert pool.devices == ["4", "5"] and sweeper.jobs_at_once(pool) == 2  # one trial per GPU
    sweeper.config = OmegaConf.create({"trainer": {"accelerator": "cpu"}})
    assert sweeper.device_pool(basic=True) is None  # CPU jobs: no pool


def runs_by_trial(tmp_path: Path) -> dict[int, object]:
    runs = mlflow_runs(tmp_path)
    return {int(r.data.tags["optuna_trial"]): r for r in runs if "optuna_trial" in r.data.tags}


@pytest.mark.slow
def test_parallel_trials_never_share_a_device(tmp_path, demo_root):
    """4 stand-in devices, 2 per trial: 2 trials at a time, 4 trials. Trial 0 raises and trial
    1's process is SIGKILLed as training starts, so trials 2 and 3 start after both ended."""
    url = optuna_storage(tmp_path)
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.devices=[0,1,2,3]",
        "hydra.sweeper.devices_per_trial=2",
        "hydra.sweeper.params=null",
        "model.optimizer.lr=interval(0.001,0.003)",
        STAND_IN_TRAINER,  # gets ++trainer.devices=2 from the sweeper, trains on one CPU
        fail_in_rank(0, [0]),
        kill_in_trials([1]),
        RECORD,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert "trial 0 fails in rank 0" in trials[0].user_attrs["fail_reason"]
    assert "job process died" in trials[1].user_attrs["fail_reason"]
    runs = runs_by_trial(tmp_path)
    assert sorted(runs) == [0, 1, 2, 3]

    devices = {}
    for t in trials:
        tags = runs[t.number].data.tags
        # the job's process saw exactly the devices the pool gave the trial: its share, 2
        assert tags["cuda_visible_devices"] == tags["devices"] == t.user_attrs["devices"]
        devices[t.number] = set(tags["devices"].split(","))
        assert len(devices[t.number]) == 2 and devices[t.number] <= {"0", "1", "2", "3"}
        assert tags["trainer_devices"] == "2"  # and its trainer was given all of them

    def interval(t):  # asked before its process started, told after its process ended
        return t.datetime_start, t.datetime_complete

    overlapping = 0
    for a, b in combinations(trials, 2):
        (a0, a1), (b0, b1) = interval(a), interval(b)
        if a0 < b1 and b0 < a1:
            overlapping += 1
            assert not devices[a.number] & devices[b.number], (
                f"trials {a.number} and {b.number} ran at once on {devices[a.number]}"
            )
    assert overlapping >= 1  # trials did run in parallel
    # devices go back to the pool however a trial ends: a trial started after the failed one
    # ended got its devices, and one started after the killed one ended got that one's
    for ended in trials[:2]:
        later = [t for t in trials if t.datetime_start > ended.datetime_complete]
        assert later, f"no trial started after trial {ended.number} ended"
        assert any(devices[t.number] == devices[ended.number] for t in later), (
            f"trial {ended.number}'s devices {devices[ended.number]} were not used again"
        )


@pytest.mark.slow
def test_plain_multirun_on_the_pool(tmp_path, demo_root):
    """The tumorseg_pool launcher: 3 jobs, 2 stand-in devices, one each."""
    res = multirun(
        tmp_path,
        demo_root,
        "model=unet,attention_unet,residual_unet",
        "hydra/launcher=tumorseg_pool",
        "hydra.launcher.devices=[0,1]",
        RECORD,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    assert sorted(r.data.tags["variant"] for r in runs) == [
        "attention_unet",
        "residual_unet",
        "unet",
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert r.data.tags["devices"] == r.data.tags["cuda_visible_devices"]
    first_two = [r for r in runs if r.data.tags["sweep_job"] in ("0", "1")]
    assert {r.data.tags["devices"] for r in first_two} == {"0", "1"}  # launched at once
    for a, b in combinations(runs, 2):
        if a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time:
            assert a.data.tags["devices"] != b.data.tags["devices"]
