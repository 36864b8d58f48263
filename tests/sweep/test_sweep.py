"""Optuna hyper-parameter search: the tumorseg_optuna Hydra sweeper, pruning, MLflow grouping."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tests.conftest import ROOT, run_train
from tests.multirun import meet
from tumorseg.sweep.runs import LIVE_TRIALS, OptunaPruning
from tumorseg.sweep.space import render, sampled_override, search_space
from tumorseg.sweep.trials import outcome_of

TINY = ["debug=tiny", "test=false"]


def parse(*lines: str):
    return OverridesParser.create().parse_overrides(list(lines))


def parsed_value(override: str):
    return parse(override)[0].value()


def fake_trainer(value: float, epoch: int) -> SimpleNamespace:
    return SimpleNamespace(
        sanity_checking=False,
        callback_metrics={"val/dice_mean": torch.tensor(value)},
        current_epoch=epoch,
        is_global_zero=True,
        world_size=1,
    )


# --- fast: search space, overrides, callback, outcomes --------------------------------------


def test_search_space_from_override_grammar():
    space, fixed = search_space(
        parse(
            "model.optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            'model.net.features=choice("[8,16,32]", [16,32,64])',
            "data.batch_size=4,8",
            "trainer.max_epochs=range(2, 9, 3)",
            "model.net.dropout=interval(0, 0.3)",
            "+extra=tag(int, interval(1, 5))",
            "model=choice(unet, residual_unet)",
            "data.image_size=64",
            "data.image_size=32",  # a later override of a key wins (the command line)
        )
    )
    assert space["model.optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.net.features"] == CategoricalDistribution(["[8,16,32]", "[16,32,64]"])
    assert space["data.batch_size"] == CategoricalDistribution([4, 8])
    assert space["trainer.max_epochs"] == IntDistribution(2, 8, step=3)
    assert space["model.net.dropout"] == FloatDistribution(0.0, 0.3)
    assert space["+extra"] == IntDistribution(1, 5)
    assert space["model"] == CategoricalDistribution(["unet", "residual_unet"])
    assert fixed == ["data.image_size=32"]


def test_sampled_values_become_overrides():
    assert parsed_value(sampled_override("model.net.features", "[8,16,32]")) == [8, 16, 32]
    assert parsed_value(sampled_override("model", "attention_unet")) == "attention_unet"
    assert parsed_value(sampled_override("lr", 1.2345678901234567e-05)) == 1.2345678901234567e-05
    assert parsed_value(sampled_override("flip", True)) is True
    assert math.isinf(parsed_value(sampled_override("lr", float("inf"))))
    callback = {"study_name": "2024", "storage": "sqlite:////tmp/a b/o.db", "pruner": None}
    assert parsed_value(f"++cb={render(callback)}") == callback


def test_outcomes_of_jobs():
    def raises(err: Exception):
        def job():
            raise err

        return job

    assert outcome_of(lambda: 0.5).state == TrialState.COMPLETE
    assert outcome_of(raises(optuna.TrialPruned("at epoch 1"))).state == TrialState.PRUNED
    failed = outcome_of(raises(FloatingPointError("loss is nan")))
    assert failed.state == TrialState.FAIL and failed.reason == "FloatingPointError: loss is nan"
    assert outcome_of(lambda: None).state == TrialState.FAIL
    assert outcome_of(lambda: float("nan")).state == TrialState.FAIL


def test_pruning_in_process_with_in_memory_study():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(0.5))
    trial = study.ask()
    LIVE_TRIALS[(study.study_name, trial.number)] = trial
    try:
        callback = OptunaPruning(study.study_name, trial.number)
        callback.on_validation_end(fake_trainer(0.7, 0), None)
        with pytest.raises(optuna.TrialPruned, match="epoch 1"):
            callback.on_validation_end(fake_trainer(0.2, 1), None)
    finally:
        LIVE_TRIALS.clear()
    assert study.trials[0].intermediate_values == pytest.approx({0: 0.7, 1: 0.2})


def test_pruning_through_the_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    number = study.ask().number
    # as in a job's process: only the storage URL, the study name and the trial number
    callback = OptunaPruning("s", number, url, pruner=optuna.pruners.ThresholdPruner(0.5))
    callback.on_validation_end(fake_trainer(0.7, 0), None)
    with pytest.raises(optuna.TrialPruned):
        callback.on_validation_end(fake_trainer(0.2, 1), None)
    trial = optuna.load_study(study_name="s", storage=url).trials[0]
    assert trial.state == TrialState.RUNNING  # the sweeper tells the outcome, not the job
    assert trial.intermediate_values == pytest.approx({0: 0.7, 1: 0.2})


# --- slow: python train.py -m hparams_search=optuna ------------------------------------------


def study_of(cwd: Path, name: str = "tumorseg-unet") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'mlruns' / 'optuna.db'}")


def mlflow_runs(cwd: Path) -> tuple[MlflowClient, dict, list]:
    """The study's parent run and its trial runs (oldest first)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tumorseg")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("optuna_parent") == "true"]
    assert len(parents) == 1
    trials = [r for r in runs if "optuna_trial" in r.data.tags]
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["optuna_study"] == "tumorseg-unet"
    return client, parents[0], trials


def sweep_results(cwd: Path) -> dict:
    (path,) = (cwd / "outputs" / "multiruns").glob("*/optimization_results.yaml")
    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_sqlite_study_resumes_and_prunes(tmp_path, demo_root):
    args = ["-m", "hparams_search=optuna", *TINY, f"data.root={demo_root}"]
    res = run_train(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stderr[-3000:]
    study = study_of(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(set(t.intermediate_values) == {0, 1} for t in study.trials)  # one per epoch

    # the same command with n_trials=3 runs exactly one more trial; this one is pruned for sure
    res = run_train(
        tmp_path,
        *args,
        "hydra.sweeper.n_trials=3",
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.lower=1.5",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED]
    assert trials[2].intermediate_values == pytest.approx({0: trials[2].value})  # at epoch 0

    client, parent, runs = mlflow_runs(tmp_path)
    assert [r.data.tags["optuna_trial"] for r in runs] == ["0", "1", "2"]
    assert [r.data.tags["optuna_state"] for r in runs] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED", "KILLED"]
    for r, t in zip(runs, trials, strict=True):
        assert r.data.params["optuna.model.optimizer.lr"] == str(t.params["model.optimizer.lr"])
        assert float(r.data.params["model.optimizer.lr"]) == t.params["model.optimizer.lr"]
        assert t.user_attrs["mlflow_run_id"] == r.info.run_id
    # trial 0, the baseline, ran the tiny config: lr 0.003 in the space, batch size 4 not
    assert trials[0].user_attrs["baseline"] and runs[0].data.tags["baseline"] == "true"
    assert trials[0].params["model.optimizer.lr"] == 0.003
    assert (
        "data.batch_size" not in trials[0].params and runs[0].data.params["data.batch_size"] == "4"
    )
    best = study_of(tmp_path).best_trial
    assert parent.info.run_name == "study:tumorseg-unet" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best.model.optimizer.lr"] == str(best.params["model.optimizer.lr"])
    assert parent.data.metrics["n_pruned"] == 1 and parent.data.metrics["n_complete"] == 2
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= plots
    assert "plots/param_importances.png" in plots


@pytest.mark.slow
def test_in_memory_study_records_a_failing_trial(tmp_path, demo_root):
    res = run_train(
        tmp_path,
        "-m",
        "hparams_search=optuna",
        *TINY,
        f"data.root={demo_root}",
        "hydra.sweeper.storage=null",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params=null",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "model.optimizer.lr=choice(0.003,0.001,inf)",  # inf: NaN loss, FloatingPointError
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "mlruns" / "optuna.db").exists()
    results = sweep_results(tmp_path)
    assert results["states"] == {"COMPLETE": 2, "FAIL": 1}
    for t in results["trials"]:
        failing = math.isinf(t["params"]["model.optimizer.lr"])
        assert t["state"] == ("FAIL" if failing else "COMPLETE")
        assert t.get("fail_reason", "").startswith("FloatingPointError: loss is nan") == failing
    _, parent, runs = mlflow_runs(tmp_path)
    assert parent.data.tags["optuna_storage"].startswith("memory:")
    states = {r.data.params["optuna.model.optimizer.lr"]: r.data.tags["optuna_state"] for r in runs}
    assert states == {"0.003": "COMPLETE", "0.001": "COMPLETE", "inf": "FAIL"}


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, demo_root):
    """Two sweepers on one SQLite study at once, one of them running 2 trials in parallel
    processes: 4 trials in all, each once in Optuna and in MLflow."""
    base = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna", *TINY]
    base += [f"data.root={demo_root}", "hydra.sweeper.n_trials=4"]
    workers = [
        subprocess.Popen(
            [*base, f"hydra.sweep.dir=outputs/w{i}", *extra],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # worker 0's trials wait for each other: its first two train at once, or fail
        for i, extra in enumerate([["hydra.sweeper.n_jobs=2", meet(tmp_path / "met", 2)], []])
    ]
    for w in workers:
        _, err = w.communicate(timeout=400)
        assert w.returncode == 0, err[-3000:]

    trials = study_of(tmp_path).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    by_worker = {}
    for t in trials:
        by_worker.setdefault(Path(t.user_attrs["sweep_dir"]).name, []).append(t.number)
    assert set(by_worker) == {"w0", "w1"}

    _, _, runs = mlflow_runs(tmp_path)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == [0, 1, 2, 3]
    assert all(r.data.tags["optuna_state"] == "COMPLETE" for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    # worker 0's first two trials trained at the same time, in two processes
    assert len(by_worker["w0"]) >= 2 and len(list((tmp_path / "met").iterdir())) >= 2
