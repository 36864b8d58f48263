"""Hydra launchers for clusters: the Optuna sweeper hands each trial to the launcher as a call of
its own, n_jobs at once, each trial a separate submitit job (here ``submitit_local``: local
processes, as SLURM would run them); pruning still works because jobs report through the
storage."""

import functools
import importlib.util
import os

import optuna
import pytest
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from tests.multirun import meet, mlflow_runs, multirun, optuna_storage, optuna_sweep
from tumorseg.config import CONF_DIR


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def needs_plugin(module: str):
    """Skip the test when launcher plugin ``module`` is not installed; fail instead when
    ``TUMORSEG_REQUIRE_LAUNCHERS`` is set (CI, where the dev extra installs it)."""

    def decorate(test):
        @functools.wraps(test)
        def checked(*args, **kwargs):
            if not installed(module):
                why = f'{module} is missing: the launcher plugins are an extra (".[cluster]")'
                if os.environ.get("TUMORSEG_REQUIRE_LAUNCHERS"):
                    pytest.fail(f"{why}, and TUMORSEG_REQUIRE_LAUNCHERS is set")
                pytest.skip(why)
            return test(*args, **kwargs)

        return checked

    return decorate


needs_submitit = needs_plugin("hydra_plugins.hydra_submitit_launcher")


@needs_submitit
def test_slurm_launcher_config_composes():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hparams_search=optuna",
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert {"cpus_per_task", "timeout_min", "mem_gb"} <= set(launcher)


@needs_submitit
@pytest.mark.slow
def test_optuna_trials_as_submitit_jobs_are_pruned_through_the_storage(tmp_path, demo_root):
    url = optuna_storage(tmp_path)
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "hydra/launcher=submitit_local",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",  # two jobs in flight
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.lower=1.5",  # no Dice reaches 1.5: pruned after epoch 0
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:  # reported from the submitit job's process, through the storage
        assert list(t.intermediate_values) == [0]
    jobs = list((tmp_path / "outputs" / "multiruns").glob("*/.submitit/*/*_result.pkl"))
    assert len(jobs) == 2  # two submitit jobs

    runs = mlflow_runs(tmp_path, "tags.optuna_state = 'PRUNED'")
    assert sorted(r.data.tags["optuna_trial"] for r in runs) == ["0", "1"]
    assert all(r.info.status == "KILLED" for r in runs)


needs_joblib = needs_plugin("hydra_plugins.hydra_joblib_launcher")
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


@needs_joblib
@pytest.mark.slow
def test_plain_multirun_under_joblib_runs_the_jobs_of_one_sweep_at_once(tmp_path, demo_root):
    met = tmp_path / "met"  # each job waits there for the other: they run at once or fail
    res = multirun(tmp_path, demo_root, "model=unet,attention_unet", *JOBLIB, meet(met, 2))
    assert res.returncode == 0, res.stderr[-3000:]
    runs = mlflow_runs(tmp_path)
    assert sorted(r.data.tags["variant"] for r in runs) == ["attention_unet", "unet"]
    assert all(r.info.status == "FINISHED" for r in runs)
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    assert {r.data.tags["sweep"] for r in runs} == {str(sweep)}
    assert sorted(r.data.tags["sweep_job"] for r in runs) == ["0", "1"]
    assert len({p.name for p in met.iterdir()}) == 2  # two joblib worker processes, at once


@needs_joblib
@pytest.mark.slow
def test_optuna_trials_go_to_joblib_one_call_each_at_once(tmp_path, demo_root):
    url = optuna_storage(tmp_path)
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",  # two jobs in flight, one joblib call each
        *JOBLIB,
        meet(tmp_path / "met", 2),  # each trial waits for the other: at once or failed
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (res.stdout + res.stderr).count("is launching 1 jobs") == 2  # joblib ran each
    trials = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    runs = {r.info.run_id: r for r in mlflow_runs(tmp_path, "tags.optuna_state = 'COMPLETE'")}
    for t in trials:  # each job found its trial through the storage and recorded its run
        run = runs.pop(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna_trial"] == str(t.number)
        assert run.data.metrics["val/dice_mean"] == pytest.approx(t.value)
    assert not runs
    assert len(list((tmp_path / "met").iterdir())) == 2  # both trials met, in two processes
