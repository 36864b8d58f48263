"""Where a run's time went: the phase recorder and the run's ``time/*`` metrics."""

import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import compose_tiny
from tumorseg.core import timing
from tumorseg.tracking.client import local_store_uri
from tumorseg.train import run

# A run's phases add up to its total by construction (``other`` is the rest); the total itself
# is measured by the test around run() (which misses the imports before it): within this.
TOTAL_TOLERANCE_S = 2.0


def test_nested_phases_count_once():
    phases = timing.Phases(from_process_start=False)
    with phases("train"):
        time.sleep(0.05)
        with phases("logging"):
            time.sleep(0.5)
    values = phases.finish()
    assert values["logging"] >= 0.5
    assert 0.05 <= values["train"] < 0.5  # without the nested 0.5 s
    assert sum(v for k, v in values.items() if k != "total") == pytest.approx(values["total"])


def test_phase_outside_a_run_records_nothing():
    timing.end()
    with timing.phase("train"):
        pass
    assert timing.active() is None


def test_run_logs_every_phase_adding_up_to_its_wall_time(tmp_path, demo_root, caplog):
    """A tiny run with MLflow: one ``time/<phase>`` metric per phase, validation apart from
    training, and the phases sum to ``time/total``, which is the run's wall time."""
    cfg = compose_tiny(tmp_path, demo_root, ["trainer.max_epochs=1", "log_model=true"])
    start = time.time()
    with caplog.at_level("INFO", logger="tumorseg.train"):
        run(cfg)
    wall = time.time() - start
    client = MlflowClient(local_store_uri(tmp_path))
    (found,) = client.search_runs([client.get_experiment_by_name("tumorseg").experiment_id])
    metrics = {k: v for k, v in found.data.metrics.items() if k.startswith("time/")}
    expected = [*timing.PHASES, "other", "total"]
    assert sorted(metrics) == sorted(f"time/{name}" for name in expected)
    for name in ("startup", "train", "validation", "test", "logging"):
        assert metrics[f"time/{name}"] > 0, name
    assert metrics["time/compile"] == 0  # model.compile=false in the tiny config
    parts = sum(v for k, v in metrics.items() if k != "time/total")
    assert parts == pytest.approx(metrics["time/total"], abs=0.01)
    # the total counts from the process start: at least the run's own wall time
    assert wall - TOTAL_TOLERANCE_S <= metrics["time/total"]
    run_s = metrics["time/total"] - metrics["time/startup"]
    assert run_s <= wall + TOTAL_TOLERANCE_S
    assert "where the time went" in caplog.text and "validation" in caplog.text
