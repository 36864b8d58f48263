"""A sweep that pays: trial 0 is the baseline, no slot idles while trials remain, trials can be
cross-validated, each records its noise, and studies can have several objectives.

Most tests sweep ``tests/sweep_app/app.py``, a tiny Hydra app whose job sleeps for a sampled
duration (pruned at once below ``prune_below``) and returns ``x`` as a Score; the folds test
trains ``debug=tiny`` models.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tests.conftest import ONE_THREAD, ROOT
from tests.multirun import mlflow_runs, optuna_storage, optuna_sweep
from tumorseg.core.errors import DataError
from tumorseg.sweep.objective import Score
from tumorseg.sweep.space import _MISFIT, _fitting
from tumorseg.sweep.trials import SlotClock, fold_outcome, outcome_of
from tumorseg.tracking.registry import study_best_run

APP = ROOT / "tests" / "sweep_app" / "app.py"
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason='the launcher plugins are an extra: pip install -e ".[cluster]"',
)


def app(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python tests/sweep_app/app.py -m ARGS`` from ``cwd`` (study in ``cwd/optuna.db``, jobs
    in ``cwd/multirun``)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, str(APP), "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def app_study(cwd: Path) -> optuna.Study:
    return optuna.load_study(study_name="app", storage=f"sqlite:///{cwd / 'optuna.db'}")


def results(cwd: Path) -> dict:
    return yaml.safe_load((cwd / "multirun" / "optimization_results.yaml").read_text())


def job_overrides(cwd: Path, number: int) -> list[str]:
    return yaml.safe_load(
        (cwd / "multirun" / str(number) / ".hydra" / "overrides.yaml").read_text()
    )


# --- fast: what a job returns, folds, the baseline's params, the clock ---------------------


def test_jobs_return_a_score_a_list_or_a_float():
    one = outcome_of(lambda: Score(0.7, 0.05, "val/dice_mean"))
    assert one.values == [0.7] and one.stderrs == [0.05]
    two = outcome_of(lambda: [Score(0.7, 0.05), Score(1e6, None)])
    assert two.values == [0.7, 1e6] and two.stderrs == [0.05, None]
    plain = outcome_of(lambda: 0.5)
    assert plain.values == [0.5] and plain.stderrs == [None]
    assert outcome_of(lambda: [0.5, float("nan")]).state == TrialState.FAIL
    assert outcome_of(lambda: []).state == TrialState.FAIL


def test_folds_make_one_value_with_their_spread_as_stderr():
    folds = [outcome_of(lambda v=v: [v, 10 * v]) for v in (0.2, 0.4, 0.6)]
    done = fold_outcome(folds)
    assert done.values == pytest.approx([0.4, 4.0])
    assert done.stderrs == pytest.approx([0.2 / 3**0.5, 2 / 3**0.5])


def test_config_values_fit_the_space_or_not():
    assert _fitting(FloatDistribution(1e-4, 1e-2, log=True), 0.003) == 0.003
    assert _fitting(FloatDistribution(1e-4, 1e-2), 0.1) is _MISFIT
    assert _fitting(IntDistribution(2, 8, step=3), 5) == 5
    assert _fitting(IntDistribution(2, 8, step=3), 4) is _MISFIT
    assert _fitting(CategoricalDistribution([8, 16]), 4) is _MISFIT
    assert _fitting(CategoricalDistribution(["unet", "attention_unet"]), "unet") == "unet"
    assert _fitting(CategoricalDistribution(["[8,16]", "[16,32]"]), [16, 32]) == "[16,32]"
    assert _fitting(CategoricalDistribution([True, False]), 1) is _MISFIT
    assert _fitting(FloatDistribution(0, 1), None) is _MISFIT


def test_slot_utilisation_is_job_time_over_slot_time():
    clock = SlotClock(slots=2)
    clock.spans = [(0.0, 4.0), (0.0, 2.0), (2.5, 4.0)]
    assert clock.wall() == 4.0
    assert clock.utilisation() == pytest.approx(7.5 / 8)


@pytest.mark.slow
def test_trial_0_runs_the_config_as_given_once(tmp_path):
    # x=0.5 in the config is not a choice of the space: run as it is, not recorded as a param
    space = ["x=choice(1.0,2.0)", "duration=interval(0.0,0.3)"]
    res = app(tmp_path, *space, "hydra.sweeper.n_trials=2")
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "baseline: x=0.5 is not in the search space" in log
    trials = app_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    base = trials[0]
    assert base.user_attrs["baseline"] is True
    assert base.params == {"duration": 0.2}  # the config's own value, where it fits
    assert base.value == 0.5  # the job ran x=0.5, the config's
    assert not [o for o in job_overrides(tmp_path, 0) if o.startswith(("x=", "duration="))]
    job = yaml.safe_load((tmp_path / "multirun" / "0" / ".hydra" / "config.yaml").read_text())
    assert (job["x"], job["duration"]) == (0.5, 0.2)
    for t in trials[1:]:  # the others run what was sampled
        assert "baseline" not in t.user_attrs
        assert f"x={t.params['x']}" in job_overrides(tmp_path, t.number)
        assert t.value == t.params["x"]

    # resuming the study adds trials, not a second baseline
    res = app(tmp_path, *space, "hydra.sweeper.n_trials=3")
    assert res.returncode == 0, res.stderr[-3000:]
    trials = app_study(tmp_path).trials
    assert len(trials) == 3 and [t.number for t in trials if t.user_attrs.get("baseline")] == [0]
    assert trials[2].value in (1.0, 2.0)


# uneven jobs: about two thirds pruned at once, the others sleep 2.5 to 4 s (each job takes a
# second more: submitit polls its result once a second); sampled by the random sampler
# (seed 0), so both schedules get the same durations, in the same order: the last trials are
# short, so the tail of the sweep (fewer trials left than slots) is short too
UNEVEN = [
    "hydra/launcher=submitit_local",
    "hydra.sweeper.storage=null",
    "hydra.sweeper.n_jobs=3",
    "hydra.sweeper.n_trials=18",
    "duration=interval(0.0,4.0)",
    "prune_below=2.5",
]


@needs_submitit
@pytest.mark.slow
def test_no_slot_idles_while_trials_remain(tmp_path):
    """Submitit jobs (local processes, as SLURM's would be): asynchronously, a new trial
    starts as soon as any ends; in batches, each batch waits for its slowest trial. One after
    the other: jobs starting at once share the cores and last longer, masking the idle time."""
    out = {}
    for schedule in ("async", "batch"):
        (tmp_path / schedule).mkdir()
        out[schedule] = app(tmp_path / schedule, *UNEVEN, f"hydra.sweeper.schedule={schedule}")
    util = {}
    for schedule, res in out.items():
        assert res.returncode == 0, res.stderr[-3000:]
        summary = results(tmp_path / schedule)
        assert summary["states"]["PRUNED"] >= 2 and summary["states"]["COMPLETE"] >= 2
        assert summary["sweep"]["schedule"] == schedule and summary["sweep"]["slots"] == 3
        assert summary["sweep"]["jobs"] == 18
        util[schedule] = summary["sweep"]["utilisation"]
        log = res.stdout + res.stderr
        assert f"{schedule} schedule: slot utilisation {util[schedule]:.2f}" in log
    assert util["async"] >= 0.85, util
    assert util["batch"] <= util["async"] - 0.1, util


@pytest.mark.slow
def test_a_cross_validated_trial_is_the_mean_of_its_folds(tmp_path, demo_root):
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "hydra.sweeper.n_trials=1",  # the baseline: the tiny config itself, on three folds
        "hydra.sweeper.folds=3",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    url = optuna_storage(tmp_path)
    (trial,) = optuna.load_study(study_name="tumorseg-unet", storage=url).trials
    assert trial.state == TrialState.COMPLETE

    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("optuna_parent") == "true"]
    (trial_run,) = [r for r in runs if r.info.run_name == "trial:0"]
    folds = sorted(
        (r for r in runs if "optuna_fold" in r.data.tags), key=lambda r: r.data.tags["optuna_fold"]
    )
    assert [r.data.tags["optuna_fold"] for r in folds] == ["0", "1", "2"]
    assert [r.data.params["data.fold"] for r in folds] == ["0", "1", "2"]
    assert all(r.data.params["data.folds"] == "3" for r in folds)
    # nested: fold runs under the trial's run, which is under the study's parent run
    assert all(r.data.tags["mlflow.parentRunId"] == trial_run.info.run_id for r in folds)
    assert trial_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert trial_run.info.status == "FINISHED"

    returned = [r.data.metrics["val/dice_mean"] for r in folds]  # what each fold's job returned
    assert trial.value == pytest.approx(sum(returned) / 3)
    assert trial.user_attrs["fold_values"] == pytest.approx(dict(zip("012", returned, strict=True)))
    mean = sum(returned) / 3
    spread = (sum((v - mean) ** 2 for v in returned) / 2 / 3) ** 0.5
    assert trial.user_attrs["stderr"] == pytest.approx(spread)
    assert trial_run.data.metrics["objective"] == pytest.approx(trial.value)
    assert trial_run.data.metrics["objective_stderr"] == pytest.approx(spread)
    assert set(trial.intermediate_values) == {0}  # only fold 0 reported to the pruner


def test_the_noise_of_each_trial_and_the_trials_within_it(tmp_path):
    res = app(
        tmp_path,
        "x=choice(0.5,0.85,0.9)",
        "duration=0.0",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.baseline=false",
        "stderr=0.1",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = results(tmp_path)
    assert all(t["stderr"] == 0.1 for t in summary["trials"] if t["state"] == "COMPLETE")
    by_x = {t["params"]["x"]: t["number"] for t in summary["trials"]}
    assert summary["best_value"] == 0.9 and summary["best_stderr"] == 0.1
    # within one standard error of the best (0.9 - 0.1 = 0.8): 0.9 itself and 0.85, not 0.5
    assert summary["within_noise"] == [by_x[0.9], by_x[0.85]]
    assert "within its noise (one standard error)" in res.stdout + res.stderr


@pytest.mark.slow
def test_two_objectives_give_a_pareto_front(tmp_path):
    """A job returning two values (the app: x to maximise, its duration to minimise); NSGA-II;
    no pruning. The parent run holds the front as a table and a figure; registering asks which
    of its trials."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = app(
        tmp_path,
        "objectives=2",
        "x=interval(0.0,1.0)",
        "duration=interval(0.0,0.2)",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra/sweeper/sampler=nsgaii",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.mlflow=true",
        "+logger.mlflow.experiment_name=app",
        f"+logger.mlflow.tracking_uri={uri}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (res.stdout + res.stderr).count("pruning is off") == 1
    study = app_study(tmp_path)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in study.trials)
    front = sorted(t.number for t in study.best_trials)
    summary = results(tmp_path)
    assert [t["number"] for t in summary["best_trials"]] == front
    for t in summary["best_trials"]:
        assert t["values"] == [t["params"].get("x", 0.5), t["params"]["duration"]]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("app")
    (parent,) = client.search_runs([exp.experiment_id], "tags.optuna_parent = 'true'")
    assert parent.data.tags["best_trials"] == ",".join(map(str, front))
    assert parent.data.tags["optuna_sampler"] == "NSGAIISampler"
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"best_trial.json", "pareto_front.md"} <= files
    assert "plots/pareto_front.png" in {
        f.path for f in client.list_artifacts(parent.info.run_id, "plots")
    }
    table = client.download_artifacts(parent.info.run_id, "pareto_front.md", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 2 + len(front)

    # tumorseg-register --study: with several best trials, it asks for --trial in one line
    assert len(front) > 1
    reg = subprocess.run(
        [sys.executable, "-m", "tumorseg.cli.register", "--study", parent.info.run_id]
        + ["--name", "m", "--tracking-uri", uri],
        capture_output=True,
        text=True,
    )
    assert reg.returncode != 0
    assert len(reg.stderr.strip().splitlines()) == 1 and "give --trial N" in reg.stderr
    # --trial N: that trial's run (the app's jobs log none: one stands in for it)
    tags = {"optuna_trial": str(front[-1]), "mlflow.parentRunId": parent.info.run_id}
    run = client.create_run(exp.experiment_id, tags=tags).info.run_id
    assert study_best_run(parent.info.run_id, uri, front[-1]) == run
    with pytest.raises(DataError, match="give --trial N"):
        study_best_run(parent.info.run_id, uri)


@pytest.mark.slow
def test_a_study_of_two_objectives_on_the_tiny_config(tmp_path, demo_root):
    """train.py returns [val/case_dice_mean, model/params] (Scores, the first with its
    bootstrap noise); widths sampled so the parameter counts differ; NSGA-II, no pruning."""
    res = optuna_sweep(
        tmp_path,
        demo_root,
        "data.val_fraction=0.5",
        "optimized_metric=[val/case_dice_mean,model/params]",
        "hydra.sweeper.direction=[maximize,minimize]",
        "hydra/sweeper/sampler=nsgaii",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params=null",
        "model.net.features=choice([4,8,16],[8,16,32])",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (res.stdout + res.stderr).count("pruning is off") == 1
    study = optuna.load_study(study_name="tumorseg-unet", storage=optuna_storage(tmp_path))
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in study.trials)
    runs = {
        r.data.tags["optuna_trial"]: r for r in mlflow_runs(tmp_path, "tags.optuna_trial != ''")
    }
    for t in study.trials:
        run = runs[str(t.number)]
        assert t.values[0] == pytest.approx(run.data.metrics["val/case_dice_mean"])
        assert t.values[1] == run.data.metrics["model/params"]
        assert t.user_attrs["stderr"][0] == pytest.approx(
            run.data.metrics["val/case_dice_mean_stderr"]
        )
    assert len({t.values[1] for t in study.trials}) == 2  # both widths were tried
    assert study.best_trials
    # tumorseg-report --study shows the Pareto front as a table and a figure
    from tests.multirun import tracking_uri
    from tumorseg.cli.report import main as report_main

    out = tmp_path / "report"
    args = ["--study", "tumorseg-unet", "--storage", optuna_storage(tmp_path)]
    assert report_main([*args, "--tracking-uri", tracking_uri(tmp_path), "--output", str(out)]) == 0
    text = (out / "study.md").read_text()
    table = text.split("## Pareto front", 1)[1].split("## Trials", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "trial" not in line]
    assert sorted(int(r.split("|")[1]) for r in rows) == sorted(t.number for t in study.best_trials)
    assert (out / "pareto_front.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tie_for_best_still_names_one_best_trial(tmp_path):
    """Two trials tie at the best value: the parent run still gets ``best_trial`` (Optuna's
    first best), which ``tumorseg-register --study`` reads."""
    from tumorseg.sweep.runs import StudyRuns

    study = optuna.create_study(direction="maximize")
    for value in (0.7, 0.9, 0.9):
        study.enqueue_trial({"x": value})
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
    cfg = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment_name": "ties"}
    runs = StudyRuns.open(cfg, study.study_name, "memory")
    runs.summarize(study)
    tags = runs.client.get_run(runs.parent_id).data.tags
    assert tags["best_trials"] == "1,2" and tags["best_trial"] == "1"
