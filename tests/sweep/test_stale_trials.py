"""Trials whose worker died: failed by heartbeat (any machine) or by process id (this machine),
queued again with the same params, and no longer counted towards ``n_trials``."""

import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from tumorseg.sweep.runs import open_storage
from tumorseg.sweep.study import StudySweep
from tumorseg.sweep.trials import taken

SPACE = {"x": FloatDistribution(0, 1)}
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


def sweeper(url: str, **kw) -> StudySweep:
    return StudySweep(n_trials=2, storage=url, mlflow=False, **kw)


def test_a_trial_without_heartbeat_fails_and_runs_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dead = study.ask(SPACE)
    dead.set_user_attr("worker", "other-machine:123")
    storage.record_heartbeat(dead._trial_id)  # then its worker stops beating
    live = study.ask(SPACE)
    sw = sweeper(url, heartbeat_interval=1, grace_period=2)
    sw.fail_stale(study, local=False)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2  # within grace

    deadline = time.monotonic() + 20
    while study.get_trials()[0].state == TrialState.RUNNING and time.monotonic() < deadline:
        storage.record_heartbeat(live._trial_id)  # the live one keeps beating
        time.sleep(0.5)
        sw.fail_stale(study, local=False)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[1].state == TrialState.RUNNING
    assert trials[0].user_attrs["fail_reason"].startswith("stale: no heartbeat")
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.user_attrs == {"retry_of": 0, "retries": 1}
    assert [t.number for t in taken(study)] == [1]  # the failure a retry replaces is out
    again = study.ask(SPACE)
    assert again.number == retry.number and again.params == dead.params

    # a retry that dies too is not queued a third time (max_retry=1)
    storage.record_heartbeat(again._trial_id)
    deadline = time.monotonic() + 20
    while study.get_trials()[again.number].state == TrialState.RUNNING:
        assert time.monotonic() < deadline
        storage.record_heartbeat(live._trial_id)
        time.sleep(0.5)
        sw.fail_stale(study, local=False)
    assert not [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert study.get_trials()[1].state == TrialState.RUNNING  # still beating


def test_a_trial_of_a_dead_local_sweeper_fails_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    trial = study.ask(SPACE)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{int(gone.stdout)}")
    mine = study.ask(SPACE)
    mine.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    sweeper(url).fail_stale(study)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.get_trials()[0].user_attrs["fail_reason"].startswith("stale: its sweeper")
