"""The device pool of parallel sweeps: each running trial (or multirun job) on its own devices.

No GPU here: a list of device indices stands in for GPUs. Each job records, in its own process,
the ``CUDA_VISIBLE_DEVICES`` it started with (an MLflow tag resolved from the job's environment)
and the ``devices`` tag; Optuna records when each trial was asked and told.
"""

from itertools import combinations
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.tumorseg_optuna_sweeper.pool import DevicePool, visible_devices
from tests.multirun import mlflow_runs, multirun

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


def runs_by_trial(tmp_path: Path) -> dict[int, object]:
    runs = mlflow_runs(tmp_path)
    return {int(r.data.tags["optuna_trial"]): r for r in runs if "optuna_trial" in r.data.tags}


@pytest.mark.slow
def test_parallel_trials_never_share_a_device(tmp_path, demo_root):
    """4 stand-in devices, 2 per trial: 2 trials at a time, 3 trials (one fails)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    res = multirun(
        tmp_path,
        demo_root,
        "hparams_search=optuna",
        f"hydra.sweeper.storage={url}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.devices=[0,1,2,3]",
        "hydra.sweeper.devices_per_trial=2",
        "hydra.sweeper.devices_key=null",  # stand-ins: the trainer stays on one CPU process
        "hydra.sweeper.params=null",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "model.optimizer.lr=choice(0.003,0.001,inf)",  # inf: NaN loss, the trial fails
        RECORD,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 2 + ["FAIL"]
    runs = runs_by_trial(tmp_path)
    assert sorted(runs) == [0, 1, 2]

    devices = {}
    for t in trials:
        tags = runs[t.number].data.tags
        # the job's process saw exactly the devices the pool gave the trial: its share, 2
        assert tags["cuda_visible_devices"] == tags["devices"] == t.user_attrs["devices"]
        devices[t.number] = set(tags["devices"].split(","))
        assert len(devices[t.number]) == 2 and devices[t.number] <= {"0", "1", "2", "3"}

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
    # devices are reused: each later trial got devices of a trial that had ended, the failed
    # one's included
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    later = [t for t in trials if t.datetime_start > failed.datetime_complete]
    used = [devices[t.number] for t in trials]
    assert any(used.count(d) > 1 for d in used)
    if later:
        assert any(devices[t.number] == devices[failed.number] for t in later)


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
    assert {r.data.tags["devices"] for r in runs[:2]} == {"0", "1"}  # the first two at once
    for a, b in combinations(runs, 2):
        if a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time:
            assert a.data.tags["devices"] != b.data.tags["devices"]
