"""``tumorseg-report --study``: the best trial against trial 0 on test patients, and whether the
validation objective ranks trials as the test patients do."""

from __future__ import annotations

import shutil

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy.stats import spearmanr

from tests.multirun import mlflow_runs, optuna_storage, optuna_sweep, tracking_uri
from tumorseg.cli.evaluate import main as evaluate_main
from tumorseg.cli.predict import main as predict_main
from tumorseg.cli.report import main as report_main
from tumorseg.data.demo import write_demo
from tumorseg.report.runs import run_cases
from tumorseg.report.study import paired_difference, rank_agreement


def cases_of(per_trial: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"trial": t, "case_id": f"c{i}", "dice": d}
            for t, values in per_trial.items()
            for i, d in enumerate(values)
        ]
    )


def test_paired_difference_is_best_minus_baseline_case_by_case():
    base = [0.5, 0.6, 0.7, 0.4, 0.8, 0.55, 0.65]
    gains = [0.10, 0.02, 0.05, -0.01, 0.03, 0.04, 0.06]
    best = [b + g for b, g in zip(base, gains, strict=True)]
    out = paired_difference(cases_of({0: base, 3: best, 5: list(reversed(base))}), 3, 0)
    assert out["n_cases"] == 7 and out["better"] == 6 and out["worse"] == 1
    assert out["mean_diff"] == pytest.approx(np.mean(gains))
    assert out["ci_low"] < np.mean(gains) < out["ci_high"] and out["ci_low"] > 0
    assert out["p_value"] == pytest.approx(0.03125)  # exact two-sided Wilcoxon, 6 of 7 up


def test_rank_agreement_is_spearman_between_objective_and_test_dice():
    trials = pd.DataFrame(
        {
            "trial": range(5),
            "state": ["COMPLETE"] * 4 + ["PRUNED"],
            "objective": [0.1, 0.2, 0.3, 0.4, np.nan],
            "test_dice": [0.70, 0.60, 0.50, 0.40, np.nan],
        }
    )
    assert rank_agreement(trials)["rho"] == pytest.approx(-1.0)
    trials["test_dice"] = [0.40, 0.45, 0.50, 0.90, np.nan]
    out = rank_agreement(trials)
    assert out["rho"] == pytest.approx(1.0) and out["n_trials"] == 4


@pytest.mark.slow
def test_study_report_compares_the_best_trial_with_trial_0_on_test_cases(tmp_path, easy_demo_root):
    """A tiny study of three trials (learning rates far apart) with the test stage on two
    test patients; the report's paired difference is recomputed from the two trials' own
    test_cases.csv artifacts."""
    res = optuna_sweep(
        tmp_path,
        easy_demo_root,
        "data.demo_difficulty=easy",
        "test=true",
        "data.val_fraction=0.25",
        "data.test_fraction=0.5",
        "trainer.max_epochs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.study_name=pays",
        "hydra.sweeper.params=null",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "model.optimizer.lr=choice(0.00001,0.003,0.03)",
        "hydra/sweeper/pruner=nop",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    storage = optuna_storage(tmp_path)
    study = optuna.load_study(study_name="pays", storage=storage)
    best = study.best_trial.number
    out = tmp_path / "report"
    code = report_main(
        ["--study", "pays", "--storage", storage, "--tracking-uri", tracking_uri(tmp_path)]
        + ["--output", str(out)]
    )
    assert code == 0
    paired = pd.read_csv(out / "paired.csv").iloc[0]
    assert paired["best_trial"] == best and paired["baseline_trial"] == 0

    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    per_trial = {}
    for run in mlflow_runs(tmp_path, "tags.optuna_study = 'pays'"):
        number = run.data.tags.get("optuna_trial")
        if number is not None and int(number) in (0, best):
            dst = tmp_path / "dl" / run.info.run_id
            dst.mkdir(parents=True)
            cases = run_cases(client, run.info.run_id, dst)
            per_trial[int(number)] = cases.groupby("case_id")["dice"].mean()
    diff = (per_trial[best] - per_trial[0]).mean()
    assert paired["n_cases"] == len(per_trial[0]) >= 1
    assert paired["mean_diff"] == pytest.approx(diff, abs=1e-9)
    trials = pd.read_csv(out / "trials.csv")
    assert trials["test_dice"].notna().sum() == 3
    rho = spearmanr(trials["objective"], trials["test_dice"]).statistic
    assert f"**{rho:.2f}**" in (out / "study.md").read_text()
    written = {p.name for p in out.iterdir()}
    assert {"study.md", "val_vs_test.png", "optimization_history.png"} <= written
    assert "parallel_coordinate.png" in written
    text = (out / "study.md").read_text()
    assert "Spearman's rho" in text and f"Trial {best} (best)" in text
    parent = mlflow_runs(tmp_path, "tags.optuna_parent = 'true'")[0]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/study.md" in logged
    assert "report/val_test_spearman" in parent.data.metrics or "Spearman" in text

    # --held-out: two cases no trial saw, each completed trial's checkpoint predicts them; the
    # best trial's case Dice equals tumorseg-predict --run + tumorseg-evaluate's on them
    extra = tmp_path / "extra"
    write_demo(extra, cases=6, seed=0, progress=False, difficulty="easy")
    held = tmp_path / "held"
    held.mkdir()
    for i in (5, 6):
        shutil.move(extra / f"BraTS20_Training_{i:03d}", held)
    out_held = tmp_path / "report_held"
    args = ["--study", "pays", "--storage", storage, "--tracking-uri", tracking_uri(tmp_path)]
    code = report_main(args + ["--output", str(out_held), "--held-out", str(held)])
    assert code == 0
    trials = pd.read_csv(out_held / "trials.csv")
    assert trials["held_out_cases"].tolist() == [2, 2, 2]
    paired = pd.read_csv(out_held / "paired.csv").iloc[0]
    assert paired["n_cases"] == 2 and paired["best_trial"] == best
    text = (out_held / "study.md").read_text()
    assert "held-out patients, paired by case" in text
    (best_run,) = [
        r
        for r in mlflow_runs(tmp_path, "tags.optuna_study = 'pays'")
        if r.data.tags.get("optuna_trial") == str(best)
    ]
    pred = tmp_path / "pred"
    uri = ["--tracking-uri", tracking_uri(tmp_path)]
    assert (
        predict_main(
            [
                "--run",
                best_run.info.run_id,
                "--input",
                str(held),
                "--output",
                str(pred),
                "--quiet",
                *uri,
            ]
        )
        == 0
    )
    scores = tmp_path / "scores.csv"
    assert (
        evaluate_main(
            [
                "--predictions",
                str(pred),
                "--references",
                str(held),
                "--output",
                str(scores),
                "--quiet",
            ]
        )
        == 0
    )
    scored = pd.read_csv(scores)
    scored = scored[scored["region"].isin(["wt", "tc", "et"])]
    expected = scored.groupby("case_id")["dice"].mean().mean()
    assert trials.set_index("trial").loc[best, "held_out_dice"] == pytest.approx(expected, abs=1e-6)
    # a second report reads the cached per-run tables: nothing is predicted again
    cached = sorted((out_held / "held_out").glob("*.csv"))
    assert len(cached) == 3
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert report_main(args + ["--output", str(out_held), "--held-out", str(held)]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report/held_out")}
    assert "report/held_out/study.md" in logged


def test_study_report_names_a_missing_study(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="other", storage=storage)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # the store exists
    code = report_main(["--study", "nope", "--storage", storage, "--tracking-uri", uri])
    assert code == 2
    err = capsys.readouterr().err
    assert "no study 'nope'" in err and str(tmp_path / "optuna.db") in err
    assert not (tmp_path / "reports").exists()


def test_held_out_needs_a_study_and_an_existing_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert report_main(["--experiment", "x", "--held-out", str(tmp_path)]) == 2
    assert "--held-out needs --study" in capsys.readouterr().err
    assert report_main(["--study", "s", "--held-out", str(missing)]) == 2
    assert f"--held-out {missing}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
