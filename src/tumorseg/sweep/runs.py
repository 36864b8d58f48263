"""Optuna trials as training runs: the pruning callback each trial's job runs, and MLflow grouping.

The ``tumorseg_optuna`` Hydra sweeper (:mod:`tumorseg.sweep.study`) adds
:class:`OptunaPruning` to every job as ``callbacks.optuna_pruning``. With an RDB storage the
callback reloads the study from the storage, so it works in whatever process runs the job. With
in-memory storage (``storage: null``) it finds the trial in :data:`LIVE_TRIALS`, which the
sweeper fills: pruning then works only for jobs run in the sweeper's own process (``n_jobs=1``).

:class:`StudyRuns` keeps a study's MLflow runs together: one parent run per study (tags
``optuna_study``, ``optuna_parent=true``, run name ``study:<name>``) with the best trial and
Optuna's plots, and an ``optuna_state`` tag on every trial run.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tumorseg.tracking import client as tracking

log = logging.getLogger(__name__)

# in-memory studies only: (study name, trial number) -> the sweeper's live trial
LIVE_TRIALS: dict[tuple[str, int], optuna.Trial] = {}


def sqlite_path(url: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` URL, else None."""
    if not url or not url.startswith("sqlite:"):
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def absolute_url(url: str | None) -> str | None:
    """A relative ``sqlite:///`` URL made absolute, so every job finds the same file."""
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return make_url(url).set(database=str(path.resolve())).render_as_string(hide_password=False)


# advisory lock keys (PostgreSQL): one per kind of set-up that must not run twice at once
LOCK_KEYS = {"schema": 0x7475_6D6F_0001, "study set-up": 0x7475_6D6F_0002}


@contextmanager
def database_lock(url: str | None, what: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock named ``what`` (one per database) for the block, so
    workers started together set up a database one after the other. Other URLs: no lock."""
    if not url or make_url(url).get_backend_name() != "postgresql":
        yield
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEYS[what]})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEYS[what]})
                conn.commit()
    finally:
        engine.dispose()


def open_storage(url: str | None, **kwargs: Any) -> optuna.storages.RDBStorage | None:
    """RDB storage for ``url`` (None: in memory); ``kwargs`` go to ``RDBStorage`` (heartbeat).

    SQLite waits up to 60 s for a locked file. On PostgreSQL the schema is created under an
    advisory lock: Optuna's own creation races (``UniqueViolation`` on ``alembic_version``)
    when workers start together on a fresh database.
    """
    if not url:
        return None
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a server restart drops pooled connections
    with database_lock(url, "schema"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat args
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def storage_label(url: str | None, sweep_dir: str) -> str:
    """Storage URL without its password; in-memory studies are one per sweep folder."""
    if not url:
        return f"memory:{sweep_dir}"
    return make_url(url).render_as_string(hide_password=True)


def find_trial(
    study_name: str,
    number: int,
    storage: str | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Trial | None:
    """Trial ``number`` of a study: reloaded from ``storage``, or the sweeper's in-memory one."""
    if not storage:
        trial = LIVE_TRIALS.get((study_name, number))
        if trial is None:
            log.warning(
                "in-memory study %s: trial %d is not in this process, no pruning",
                study_name,
                number,
            )
        return trial
    study = optuna.load_study(
        study_name=study_name,
        storage=open_storage(storage),
        sampler=optuna.samplers.RandomSampler(),  # never samples here; cheapest to build
        pruner=pruner,
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.Trial(study, trial_id)


def mlflow_key(name: str) -> str:
    """``name`` with characters MLflow refuses in keys replaced by ``_``."""
    return re.sub(r"[^\w.\-/ ]", "_", name)


class OptunaPruning(L.Callback):
    """Reports ``monitor`` to the Optuna trial after every validation; raises
    :class:`optuna.TrialPruned` when the study's pruner says so.

    At fit start it also nests the MLflow run under the study's parent run
    (``mlflow.parentRunId``; for a fold of a cross-validated trial, under the trial's run),
    logs the sampled values as ``optuna.<name>`` params and records the run id on the trial
    (user attr ``mlflow_run_id``, or ``mlflow_run_id.fold<k>``). With ``report`` false it
    neither reports nor prunes: studies of several objectives, and folds other than 0 (one
    learning curve per trial).
    """

    def __init__(
        self,
        study_name: str,
        trial_number: int,
        storage: str | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
        monitor: str = "val/dice_mean",
        parent_run_id: str | None = None,
        report: bool = True,
        fold: int | None = None,
    ) -> None:
        self.report = report  # False: no reports, no pruning (several objectives, folds > 0)
        self.fold = fold
        self.study_name = study_name
        self.trial_number = int(trial_number)
        self.storage = storage
        self.pruner = pruner
        self.monitor = monitor
        self.parent_run_id = parent_run_id
        self._trial: optuna.Trial | None = None
        self._looked_up = False

    def trial(self) -> optuna.Trial | None:
        """The trial this run belongs to (looked up once)."""
        if not self._looked_up:
            self._looked_up = True
            self._trial = find_trial(self.study_name, self.trial_number, self.storage, self.pruner)
        return self._trial

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trial = self.trial()
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if logger is None:
            return
        if self.parent_run_id:
            logger.experiment.set_tag(logger.run_id, "mlflow.parentRunId", self.parent_run_id)
        if trial is not None:
            logger.log_hyperparams({f"optuna.{mlflow_key(k)}": v for k, v in trial.params.items()})
            key = "mlflow_run_id" if self.fold is None else f"mlflow_run_id.fold{self.fold}"
            trial.set_user_attr(key, logger.run_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.report:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value, epoch, prune = float(value), trainer.current_epoch, False
        trial = self.trial() if trainer.is_global_zero else None
        if trial is not None:
            trial.report(value, epoch)
            prune = trial.should_prune()
        if trainer.world_size > 1:  # every rank stops, or none
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.monitor}={value:.4f}")


def tracking_target(mlflow_cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """Tracking URI and new-experiment artifact location, as ``make_mlflow_logger`` picks them."""
    return tracking.tracking_target(mlflow_cfg.get("tracking_uri"), mlflow_cfg.get("root_dir"))


@dataclass
class StudyRuns:
    """The MLflow side of one study: its parent run and the ``optuna_state`` of trial runs."""

    client: MlflowClient
    experiment_id: str
    study_name: str
    storage: str  # storage_label(): which study of that name
    parent_id: str = ""

    @classmethod
    def open(cls, mlflow_cfg: Mapping[str, Any], study_name: str, storage: str) -> StudyRuns:
        """Connect as the training runs do and find (or start) the study's parent run."""
        uri, artifacts = tracking_target(mlflow_cfg)
        client = MlflowClient(tracking_uri=uri)
        exp = tracking.ensure_experiment(client, mlflow_cfg["experiment_name"], artifacts)
        runs = cls(client, exp, study_name, storage)
        runs.parent_id = runs._parent()
        return runs

    def _search(self, query: str, order: str = "ASC") -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.optuna_study = '{self.study_name}' AND {query}",
            order_by=[f"attributes.start_time {order}"],
        )

    def _parent(self) -> str:
        query = f"tags.optuna_parent = 'true' AND tags.optuna_storage = '{self.storage}'"
        found = self._search(query)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = {"optuna_study": self.study_name, "optuna_parent": "true"}
        own = self.client.create_run(
            self.experiment_id,
            run_name=f"study:{self.study_name}",
            tags={**tags, "optuna_storage": self.storage},
        ).info.run_id
        first = self._search(query)[0].info.run_id  # a worker elsewhere may have made one too
        if first != own:
            self.client.delete_run(own)
        return first

    def mark(self, number: int, state: TrialState, run_id: str | None = None) -> None:
        """Tag trial ``number``'s run (``run_id`` when known) ``optuna_state``; pruned runs end
        KILLED, runs left RUNNING (their job died) end FAILED."""
        if run_id:
            run = self.client.get_run(run_id)
        else:
            found = self._search(f"tags.optuna_trial = '{number}'", order="DESC")
            nested = [r for r in found if r.data.tags.get("mlflow.parentRunId") == self.parent_id]
            run = (nested or found or [None])[0]
        if run is None:
            log.info("trial %d has no MLflow run (it failed before training)", number)
            return
        self.client.set_tag(run.info.run_id, "optuna_state", state.name)
        if state == TrialState.PRUNED:
            self.client.set_terminated(run.info.run_id, status="KILLED")
        elif run.info.status == "RUNNING":  # the job died without closing its run
            self.client.set_terminated(run.info.run_id, status="FAILED")

    def trial_run(self, number: int, baseline: bool = False) -> str:
        """A run for cross-validated trial ``number``, nested under the parent run: its folds'
        runs nest under it."""
        tags = {
            "optuna_study": self.study_name,
            "optuna_trial": str(number),
            "mlflow.parentRunId": self.parent_id,
        }
        if baseline:
            tags["baseline"] = "true"
        run = self.client.create_run(self.experiment_id, run_name=f"trial:{number}", tags=tags)
        return run.info.run_id

    def end_trial_run(self, run_id: str | None, trial: optuna.trial.FrozenTrial) -> None:
        """The trial run of a cross-validated trial: its state, value(s), standard error and
        fold values; FINISHED when complete, KILLED when pruned, else FAILED."""
        if not run_id:
            return
        self.client.set_tag(run_id, "optuna_state", trial.state.name)
        for name, value in objective_metrics(trial).items():
            self.client.log_metric(run_id, name, value)
        for fold, value in (trial.user_attrs.get("fold_values") or {}).items():
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                self.client.log_metric(run_id, f"fold{fold}/objective" + (f"_{i}" if i else ""), v)
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
        self.client.set_terminated(run_id, status=status.get(trial.state, "FAILED"))

    def log_stderr(self, run_id: str | None, stderr: Any) -> None:
        """The standard error of the trial's objective, as metric ``objective_stderr`` (``_1``,
        ``_2`` for further objectives) of its run."""
        if not run_id or stderr is None:
            return
        for i, se in enumerate(stderr if isinstance(stderr, list) else [stderr]):
            if se is not None:
                self.client.log_metric(run_id, "objective_stderr" + (f"_{i}" if i else ""), se)

    def summarize(self, study: optuna.Study, sweep: Mapping[str, Any] | None = None) -> None:
        """Counts, best trial(s), the trials within the noise of the best, slot utilisation
        and plots into the parent run, which then ends FINISHED."""
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        step = sum(counts[s] for s in ("COMPLETE", "PRUNED", "FAIL"))
        parent = self.parent_id
        for state in ("COMPLETE", "PRUNED", "FAIL"):
            self.client.log_metric(parent, f"n_{state.lower()}", counts[state], step=step)
        if sweep and sweep.get("utilisation") is not None:
            self.client.log_metric(parent, "slot_utilisation", sweep["utilisation"], step=step)
            self.client.set_tag(parent, "schedule", str(sweep.get("schedule")))
        self.client.set_tag(parent, "optuna_sampler", type(study.sampler).__name__)
        self.client.set_tag(parent, "optuna_pruner", type(study.pruner).__name__)
        directions = [d.name.lower() for d in study.directions]
        self.client.set_tag(parent, "optuna_direction", ",".join(directions))
        summary = best_summary(study)
        if summary:
            best = summary["best_trials"]
            self.client.set_tag(parent, "best_trials", ",".join(str(t["number"]) for t in best))
            if len(directions) == 1:  # ties share the front; Optuna's best trial is the first
                self.client.log_metric(parent, "best_value", summary["value"], step=step)
                self.client.log_metric(parent, "best_trial", summary["number"], step=step)
                self.client.set_tag(parent, "best_trial", str(summary["number"]))
                for name, value in summary["params"].items():  # params cannot change: tags can
                    self.client.set_tag(parent, f"best.{mlflow_key(name)}", str(value))
            if "within_noise" in summary:
                noise = ",".join(str(t["number"]) for t in summary["within_noise"])
                self.client.set_tag(parent, "within_noise", noise)
            if sweep:
                summary["sweep"] = dict(sweep)
            self.client.log_dict(parent, json.loads(json.dumps(summary)), "best_trial.json")
            if len(directions) > 1:
                self.client.log_text(parent, pareto_table(summary), "pareto_front.md")
        with tempfile.TemporaryDirectory() as tmp:
            for path in study_plots(study, Path(tmp)):
                self.client.log_artifact(parent, str(path), "plots")
        self.client.set_terminated(parent, status="FINISHED")


def objective_metrics(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """``objective`` (``objective_1``... for further objectives) and ``objective_stderr``."""
    out: dict[str, float] = {}
    for i, value in enumerate(trial.values or []):
        out["objective" + (f"_{i}" if i else "")] = value
    stderr = trial.user_attrs.get("stderr")
    for i, se in enumerate(stderr if isinstance(stderr, list) else [stderr]):
        if se is not None:
            out["objective_stderr" + (f"_{i}" if i else "")] = se
    return out


def within_noise(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The one-standard-error rule: completed trials whose value lies within the best trial's
    standard error of the best value (``|value - best| <= stderr(best)``), best first. Just
    the best where its standard error is unknown. Single-objective studies only."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(study.directions) > 1 or not complete:
        return []
    best = study.best_trial
    se = best.user_attrs.get("stderr")
    if se is None:
        return [best]
    close = [t for t in complete if abs(t.value - best.value) <= se]
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(close, key=lambda t: (sign * t.value, t.number))


def _brief(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    out = {"number": trial.number, "values": trial.values, "params": trial.params}
    out["stderr"] = trial.user_attrs.get("stderr")
    if trial.user_attrs.get("baseline"):
        out["baseline"] = True
    return out


def best_summary(study: optuna.Study) -> dict[str, Any]:
    """The best trial (several: the Pareto front) and, for one objective, the trials within
    the noise of the best; empty before any trial completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return {}
    directions = [d.name.lower() for d in study.directions]
    best = sorted(study.best_trials, key=lambda t: t.number)
    out: dict[str, Any] = {"directions": directions, "best_trials": [_brief(t) for t in best]}
    if len(directions) == 1:
        t = study.best_trial
        out |= {"number": t.number, "value": t.value, "params": t.params}
        out["stderr"] = t.user_attrs.get("stderr")
        out["noise_rule"] = "within one standard error of the best: |value - best| <= stderr"
        out["within_noise"] = [_brief(t) for t in within_noise(study)]
    return json.loads(json.dumps(out, default=str))


def pareto_table(summary: Mapping[str, Any]) -> str:
    """The Pareto front of ``best_summary`` as a Markdown table: trial, values, params."""
    directions = summary["directions"]
    keys = sorted({k for t in summary["best_trials"] for k in t["params"]})
    head = ["trial", *(f"objective {i} ({d})" for i, d in enumerate(directions)), *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in summary["best_trials"]:
        cells = [str(t["number"]), *(f"{v:.4g}" for v in t["values"])]
        cells += [str(t["params"].get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def study_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's matplotlib plots as PNGs: optimization history, parallel coordinates and, with
    at least two completed trials over more than one param, param importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) > 1:
        plots = {"pareto_front": ovm.plot_pareto_front} if len(study.directions) <= 3 else {}
    else:
        plots = {
            "optimization_history": ovm.plot_optimization_history,
            "parallel_coordinate": ovm.plot_parallel_coordinate,
        }
    several_params = len({k for t in complete for k in t.params}) > 1
    if len(study.directions) == 1 and len(complete) >= 2 and several_params:
        plots["param_importances"] = ovm.plot_param_importances
    paths = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning and friends
                axes = plot(study)
        except Exception as err:  # a plot is a bonus: never fail the sweep over one
            log.warning("plot %s skipped: %s", name, err)
            continue
        fig = getattr(axes, "figure", None) or axes.flat[0].figure
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def trial_summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """Number, state, value(s), params and what else the trial recorded: standard error, fold
    values, baseline, and (for FAIL) the reason."""
    out: dict[str, Any] = {"number": trial.number, "state": trial.state.name}
    if trial.values is not None and len(trial.values) > 1:
        out["values"] = trial.values
    else:
        out["value"] = trial.values[0] if trial.values else None
    out["params"] = trial.params
    for key in ("stderr", "fold_values", "baseline", "fail_reason"):
        if key in trial.user_attrs:
            out[key] = trial.user_attrs[key]
    return out


def results(
    study: optuna.Study, storage: str, sweep: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The study in a few plain fields, for ``optimization_results.yaml`` in the sweep folder;
    ``sweep``: this sweep's schedule, slots and slot utilisation."""
    trials = study.get_trials(deepcopy=False)
    directions = [d.name.lower() for d in study.directions]
    out: dict[str, Any] = {
        "study_name": study.study_name,
        "storage": storage,
        "direction": directions[0] if len(directions) == 1 else directions,
        "states": dict(Counter(t.state.name for t in trials)),
        "trials": [trial_summary(t) for t in trials],
    }
    if sweep:
        out["sweep"] = dict(sweep)
    best = best_summary(study)
    if best and len(directions) == 1:
        out |= {"best_trial": best["number"], "best_value": best["value"]}
        out |= {"best_params": best["params"], "best_stderr": best["stderr"]}
        out["within_noise"] = [t["number"] for t in best["within_noise"]]
        out["noise_rule"] = best["noise_rule"]
    elif best:
        out["best_trials"] = best["best_trials"]
    return json.loads(json.dumps(out, default=str))  # plain types only, for YAML
