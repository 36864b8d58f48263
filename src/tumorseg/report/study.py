"""Did the sweep pay? The best trial of an Optuna study against its baseline, on test patients.

``build_study_report`` (behind ``tumorseg-report --study NAME``) reads the study from its
Optuna storage and each trial's case-level test results (``evaluation/test_cases.csv``, the
test stage's) from its MLflow runs, tagged ``optuna_study`` / ``optuna_trial`` (with
``hydra.sweeper.folds`` a trial has one run per fold; a case's Dice is averaged over them). A
case's score is its mean WT/TC/ET Dice, as the test stage's ``test/dice_mean`` averages it.

* **The winner against the baseline**: trial 0 (the config as given; the sweeper enqueues it)
  against the best trial (``--trial N`` for another, or for a multi-objective study, where
  the default is the Pareto trial best on the first objective), paired by test case: mean
  difference (best − baseline) with a 95 % percentile bootstrap interval over the cases,
  the two-sided Wilcoxon signed-rank p-value, and how many cases got better.
* **Can the objective be trusted?** Spearman's rho, across the study's completed trials,
  between the trial's objective (the first one) and its mean case-level test Dice.
* **Held-out patients** (``--held-out DIR``, labelled case folders no trial trained, validated
  or was tested on): each completed trial's kept checkpoint predicts them through the inference
  path, as the test stage predicts, and they replace the test patients in both comparisons.
  Each run's per-case table is kept in ``<output>/held_out/<run_id>.csv``: a second report
  predicts nothing again.
* **The noise**: each trial's objective with its standard error (trial attr ``stderr``), and
  the trials whose objective lies within one standard error of the best's
  (``tumorseg.sweep.runs.within_noise``).

Files in ``reports/<study>/`` (``--output``): ``study.md``, ``trials.csv``, ``paired.csv``,
``val_vs_test.png``, ``paired_difference.png``, Optuna's ``optimization_history.png``,
``parallel_coordinate.png`` and ``param_importances.png`` or, for several objectives, the Pareto
front (a table in ``study.md`` and ``pareto_front.png``); the same files go to the study's MLflow
parent run (tag ``optuna_parent``) under ``report/`` (``report/held_out/`` for ``--held-out``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tumorseg.core.errors import DataError
from tumorseg.evaluation.cases import RESAMPLES, SEED, bootstrap_ci
from tumorseg.report.compare import write_files
from tumorseg.report.render import markdown_table
from tumorseg.report.runs import run_cases
from tumorseg.report.stats import paired_test
from tumorseg.sweep.runs import best_summary, pareto_table, study_plots, within_noise

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


STUDY_FILES = (
    "study.md",
    "trials.csv",
    "paired.csv",
    "val_vs_test.png",
    "paired_difference.png",
    "pareto_front.png",
    "optimization_history.png",
    "parallel_coordinate.png",
    "param_importances.png",
)
BASELINE_ATTR = "baseline"  # user attr the sweeper sets on the enqueued config-as-given trial


@dataclass
class HeldOut:
    """Patients to score the trials on in place of the test stage's (``--held-out``)."""

    folder: Path  # labelled case folders no trial saw
    tracking_uri: str  # where the trials' checkpoints are
    cache: Path  # per-run case tables, kept between reports
    device: str = "auto"


# ---------------------------------------------------------------- reading


def load_study(name: str, storage: str) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError as err:
        raise DataError(f"no study {name!r} in {storage}") from err


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial marked as the config as given, else trial 0."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        raise DataError(f"study {study.study_name!r} has no trials")
    marked = [t for t in trials if t.user_attrs.get(BASELINE_ATTR)]
    return marked[0] if marked else min(trials, key=lambda t: t.number)


def best_trial(study: optuna.Study, number: int | None = None) -> optuna.trial.FrozenTrial:
    """Trial ``number``, else the best (multi-objective: the Pareto trial best on the first
    objective)."""
    from optuna.trial import TrialState

    if number is not None:
        found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not found or found[0].state != TrialState.COMPLETE:
            raise DataError(f"study {study.study_name!r} has no completed trial {number}")
        return found[0]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise DataError(f"study {study.study_name!r} has no completed trial")
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1 if study.directions[0].name == "MAXIMIZE" else -1
    return max(study.best_trials, key=lambda t: sign * t.values[0])


def trial_runs(client: MlflowClient, study: str) -> dict[int, list[str]]:
    """Trial number -> ids of its MLflow runs holding case-level test results (one per fold)."""
    found: dict[int, list[str]] = {}
    for exp in client.search_experiments():
        for run in client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.optuna_study = '{study}'",
            max_results=5000,
        ):
            tags = run.data.tags
            if tags.get("optuna_parent") == "true" or "optuna_trial" not in tags:
                continue
            found.setdefault(int(tags["optuna_trial"]), []).append(run.info.run_id)
    return found


def per_trial(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Runs' per-region case tables (``case_id``, ``dice``, ``trial``) -> per trial and case:
    the mean Dice over the regions, then over the trial's runs (its folds)."""
    if not parts:
        return pd.DataFrame(columns=["trial", "case_id", "dice"])
    runs = [p.groupby(["trial", "case_id"], as_index=False)["dice"].mean() for p in parts]
    return pd.concat(runs).groupby(["trial", "case_id"], as_index=False)["dice"].mean()


def trial_cases(client: MlflowClient, runs: dict[int, list[str]]) -> pd.DataFrame:
    """Per trial and test case: mean WT/TC/ET Dice (averaged over the trial's fold runs)."""
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, run_ids in runs.items():
            for run_id in run_ids:
                dst = Path(tmp) / run_id
                dst.mkdir()
                try:
                    cases = run_cases(client, run_id, dst)
                except (FileNotFoundError, ValueError):
                    continue  # a pruned trial, or a trial parent run of folds
                parts.append(cases.assign(trial=number))
    return per_trial(parts)


def held_out_cases(
    study: optuna.Study, runs: dict[int, list[str]], held_out: HeldOut
) -> pd.DataFrame:
    """Per completed trial and case of ``held_out.folder``: the mean WT/TC/ET Dice of the
    trial's kept checkpoint (averaged over its fold runs), predicted through the inference path
    volume by volume (``tumorseg.evaluation.test_stage.case_dice``, as the test stage scores).
    Each run's per-case table is read from, or written to, ``held_out.cache/<run_id>.csv``."""
    from optuna.trial import TrialState

    from tumorseg.core.files import write_atomically
    from tumorseg.data.readers import list_cases
    from tumorseg.evaluation.test_stage import case_dice
    from tumorseg.inference.predict import load_for_inference
    from tumorseg.tracking.registry import checkpoint_from_run

    folder, cache = held_out.folder, held_out.cache
    if not folder.is_dir():
        raise DataError(f"--held-out {folder}: no such folder")
    refs = list_cases(folder, labelled=True)
    if not refs:
        raise DataError(f"--held-out {folder}: no labelled cases (case folders with a seg file)")
    complete = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    parts = []
    for number, run_ids in sorted(runs.items()):
        if number not in complete:
            continue
        for run_id in run_ids:
            path = cache / f"{run_id}.csv"
            if path.is_file():
                table = pd.read_csv(path)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        ckpt = checkpoint_from_run(run_id, held_out.tracking_uri, Path(tmp))
                    except DataError:
                        continue  # the trial's parent run of its folds: no checkpoint
                    module = load_for_inference(ckpt, held_out.device)
                    log.info("trial %d: predicting %d held-out cases", number, len(refs))
                    table = case_dice(module, (ref.load() for ref in refs))
                write_atomically([(path, lambda p, t=table: t.to_csv(p, index=False))])
            parts.append(table.assign(trial=number))
    return per_trial(parts)


# ---------------------------------------------------------------- statistics


def dice_column(patients: str) -> str:
    """The trial table's column of the mean case Dice on ``patients`` (``test``: the test
    stage's; ``held-out``: ``--held-out``'s): ``test_dice``, ``held_out_dice``."""
    return patients.replace("-", "_") + "_dice"


def trial_table(study: optuna.Study, cases: pd.DataFrame, patients: str = "test") -> pd.DataFrame:
    """One row per trial: number, state, objective(s), stderr, baseline, mean case Dice on
    ``patients`` and their count, params."""
    test = cases.groupby("trial")["dice"].agg(["mean", "count"])
    col = dice_column(patients)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        values = t.values or [np.nan] * len(study.directions)
        for i, v in enumerate(values):
            row["objective" if i == 0 else f"objective_{i}"] = v
        se = t.user_attrs.get("stderr")
        se = se[0] if isinstance(se, list) else se  # several objectives: the first's
        row["stderr"] = np.nan if se is None else se
        row["baseline"] = bool(t.user_attrs.get(BASELINE_ATTR)) or t.number == 0
        row[col] = test["mean"].get(t.number, np.nan)
        row[col.replace("_dice", "_cases")] = int(test["count"].get(t.number, 0))
        row |= {f"param.{k}": v for k, v in t.params.items()}
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(
    cases: pd.DataFrame, best: int, base: int, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Any]:
    """Best − baseline mean case Dice on the cases both were scored on."""
    wide = cases.pivot(index="case_id", columns="trial", values="dice")
    out: dict[str, Any] = {"best_trial": best, "baseline_trial": base, "n_cases": 0}
    if best not in wide or base not in wide:
        missing = [n for n in (best, base) if n not in wide]
        out["note"] = "no case-level test results for trial " + ", ".join(map(str, missing))
        return out
    if best == base:
        out["note"] = "the baseline is the best trial: the sweep found nothing better"
    pair = wide[[base]].assign(_best=wide[best]).dropna()
    pair.columns = ["baseline", "best"]
    diff = (pair["best"] - pair["baseline"]).to_numpy(float)
    n = len(diff)
    out |= {
        "n_cases": n,
        "baseline_dice": float(pair["baseline"].mean()),
        "best_dice": float(pair["best"].mean()),
        "mean_diff": float(diff.mean()) if n else np.nan,
        "better": int((diff > 0).sum()),
        "worse": int((diff < 0).sum()),
    }
    if n >= 2:
        out["ci_low"], out["ci_high"] = bootstrap_ci(diff, resamples, seed)
    test = paired_test(pair["baseline"], pair["best"])  # Wilcoxon, as tumorseg-report's
    if "p_value" in test and np.isfinite(test["p_value"]):
        out["p_value"] = test["p_value"]
    out["note"] = out.get("note") or test["note"]
    return out


def rank_agreement(trials: pd.DataFrame, patients: str = "test") -> dict[str, Any]:
    """Spearman's rho between the objective and the mean case-level Dice on ``patients``,
    over the completed trials with both."""
    from scipy.stats import spearmanr

    col = dice_column(patients)
    done = trials[(trials["state"] == "COMPLETE")].dropna(subset=["objective", col])
    out: dict[str, Any] = {"n_trials": len(done)}
    if len(done) < 3 or done["objective"].nunique() < 2 or done[col].nunique() < 2:
        out["note"] = "fewer than 3 completed trials with distinct scores: no rank correlation"
        return out
    rho, p = spearmanr(done["objective"], done[col])
    return out | {"rho": float(rho), "p_value": float(p), "note": ""}


# ---------------------------------------------------------------- rendering


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "–" if not np.isfinite(value) else f"{value:+.{digits}f}"
    return str(value)


def study_markdown(
    study: optuna.Study,
    trials: pd.DataFrame,
    paired: dict[str, Any],
    ranks: dict[str, Any],
    close: list[int],
    patients: str = "test",
) -> str:
    """The report as Markdown: the verdict, the rank agreement, the noise, every trial."""
    lines = [f"# Study {study.study_name}", ""]
    lines.append(
        f"{len(trials)} trials; objective(s) to "
        f"{', '.join(d.name.lower() for d in study.directions)}."
    )
    lines += ["", f"## Best trial against the baseline ({patients} patients, paired by case)", ""]
    if paired.get("n_cases"):
        ci = (
            f"95 % CI {_fmt(paired['ci_low'])} to {_fmt(paired['ci_high'])}"
            if "ci_low" in paired
            else "no interval"
        )
        p = f"Wilcoxon p {paired['p_value']:.3g}" if "p_value" in paired else paired["note"]
        lines.append(
            f"Trial {paired['best_trial']} (best) − trial {paired['baseline_trial']} "
            f"(baseline, the config as given): mean case Dice {paired['best_dice']:.4f} vs "
            f"{paired['baseline_dice']:.4f}, difference **{_fmt(paired['mean_diff'])}** "
            f"({ci}; {p}); better on {paired['better']} of {paired['n_cases']} cases, worse "
            f"on {paired['worse']}."
        )
    else:
        lines.append(paired.get("note", "no paired cases"))
    lines += [
        "",
        f"## Does the validation objective rank trials as the {patients} patients do?",
        "",
    ]
    if "rho" in ranks:
        lines.append(
            f"Spearman's rho between the objective and the mean case-level {patients} Dice over "
            f"{ranks['n_trials']} completed trials: **{ranks['rho']:.2f}** "
            f"(p {ranks['p_value']:.3g})."
        )
    else:
        lines.append(ranks["note"])
    lines += ["", "## The noise", ""]
    lines.append(
        f"Trials within one standard error of the best's objective: {', '.join(map(str, close))}"
        if close
        else "No trial records a standard error."
    )
    if len(study.directions) > 1:
        lines += ["", "## Pareto front", "", pareto_table(best_summary(study)).rstrip()]
        lines += ["", "![Pareto front](pareto_front.png)"]
    lines += ["", "## Trials", ""]
    cols = [c for c in trials.columns if c != "baseline"]
    rows = [[_cell(r[c]) for c in cols] for _, r in trials.iterrows()]
    lines += markdown_table(cols, rows)
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def save_val_vs_test(
    trials: pd.DataFrame, paired: dict[str, Any], path: Path, patients: str = "test"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = dice_column(patients)
    done = trials[trials["state"] == "COMPLETE"].dropna(subset=["objective", col])
    fig, ax = plt.subplots(figsize=(5, 4))
    se = done["stderr"].where(np.isfinite(done["stderr"]), 0)
    ax.errorbar(done["objective"], done[col], xerr=se, fmt="o", alpha=0.7, label="trial")
    for key, marker, label in (("baseline_trial", "s", "baseline"), ("best_trial", "*", "best")):
        row = done[done["trial"] == paired.get(key)]
        if not row.empty:
            ax.scatter(row["objective"], row[col], marker=marker, s=150, label=label)
    ax.set_xlabel("validation objective (± standard error)")
    ax.set_ylabel(f"mean case-level {patients} Dice")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_paired(
    cases: pd.DataFrame, paired: dict[str, Any], path: Path, patients: str = "test"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = cases.pivot(index="case_id", columns="trial", values="dice")
    best, base = paired["best_trial"], paired["baseline_trial"]
    diff = (wide[best] - wide[base]).dropna().sort_values()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(diff)), diff.to_numpy(), color=np.where(diff > 0, "tab:green", "tab:red"))
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(diff.mean(), color="tab:blue", ls="--", label=f"mean {diff.mean():+.4f}")
    ax.set_xlabel(f"{patients} case (sorted)")
    ax.set_ylabel(f"Dice, trial {best} − trial {base}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def optuna_plots(study: optuna.Study) -> dict[str, bytes]:
    """Optuna's figures of the study (``tumorseg.sweep.runs.study_plots``: optimization
    history, parallel coordinates and param importances, or the Pareto front), as PNG bytes by
    file name."""
    with tempfile.TemporaryDirectory() as tmp:
        return {p.name: p.read_bytes() for p in study_plots(study, Path(tmp))}


# ---------------------------------------------------------------- everything


def build_study_report(
    client: MlflowClient,
    study: optuna.Study,
    trial: int | None = None,
    held_out: HeldOut | None = None,
) -> tuple[dict[str, Callable[[Path], None]], dict[str, Any]]:
    """Read, compute and return the file writers and the numbers (``paired``, ``ranks``,
    ``within_noise``, ``patients``): on the test stage's cases, or on ``held_out``'s."""
    base = baseline_trial(study)
    best = best_trial(study, trial)
    runs = trial_runs(client, study.study_name)
    if held_out is None:
        patients, cases = "test", trial_cases(client, runs)
    else:
        patients = "held-out"
        cases = held_out_cases(study, runs, held_out)
    trials = trial_table(study, cases, patients)
    close = [t.number for t in within_noise(study)]
    paired = paired_difference(cases, best.number, base.number)
    ranks = rank_agreement(trials, patients)
    md = study_markdown(study, trials, paired, ranks, close, patients)
    writers: dict[str, Callable[[Path], None]] = {
        "study.md": lambda p: p.write_text(md),
        "trials.csv": lambda p: trials.to_csv(p, index=False),
        "paired.csv": lambda p: pd.DataFrame([paired]).to_csv(p, index=False),
        "val_vs_test.png": lambda p: save_val_vs_test(trials, paired, p, patients),
    }
    if paired.get("n_cases"):
        writers["paired_difference.png"] = lambda p: save_paired(cases, paired, p, patients)
    for name, png in optuna_plots(study).items():
        writers[name] = lambda p, png=png: p.write_bytes(png)
    numbers = {"paired": paired, "ranks": ranks, "within_noise": close, "patients": patients}
    return writers, numbers


def write_study_files(output: Path, writers: dict[str, Callable[[Path], None]]) -> list[Path]:
    return write_files(output, writers, STUDY_FILES)


def log_to_parent(client: MlflowClient, study: str, paths: list[Path], numbers: dict) -> str:
    """The report files under ``report/`` (held-out patients: ``report/held_out/``) of the
    study's parent run, with its numbers as metrics; returns the parent run's id ("" when
    the study has none in MLflow)."""
    for exp in client.search_experiments():
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.optuna_study = '{study}' AND tags.optuna_parent = 'true'",
        )
        if found:
            break
    else:
        return ""
    run_id = found[0].info.run_id
    paired, ranks = numbers["paired"], numbers["ranks"]
    # on held-out patients: report/held_out/... beside the test stage's report/...
    pre = "report/" if numbers.get("patients", "test") == "test" else "report/held_out/"
    metrics = {
        f"{pre}best_minus_baseline": paired.get("mean_diff"),
        f"{pre}best_minus_baseline_ci_low": paired.get("ci_low"),
        f"{pre}best_minus_baseline_ci_high": paired.get("ci_high"),
        f"{pre}wilcoxon_p": paired.get("p_value"),
        f"{pre}val_test_spearman": ranks.get("rho"),
    }
    for key, value in metrics.items():
        if value is not None and np.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for path in paths:
        client.log_artifact(run_id, str(path), pre.rstrip("/"))
    return run_id
