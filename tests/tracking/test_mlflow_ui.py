"""A plain ``mlflow ui`` in the folder ``train.py`` ran in serves its runs: the REST API, and the
runs table and compare view in a real (headless) Chromium.

One multirun trains the three variants (tiny); one server is started over it for the module,
on a free loopback port, and stopped by its PID. Screenshots go to ``$TUMORSEG_TEST_ARTIFACTS``
(default ``outputs/test-artifacts``) in ``mlflow_ui/``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests import mlflow_browser
from tests.conftest import ROOT, run_train
from tumorseg.tracking import client as tracking

pytestmark = pytest.mark.slow

STARTUP_S = 120  # the server imports slowly on a busy 2-core machine
VARIANTS = ("unet", "attention_unet", "residual_unet")
ARTIFACTS = Path(os.environ.get("TUMORSEG_TEST_ARTIFACTS", ROOT / "outputs" / "test-artifacts"))
SHOTS = ARTIFACTS / "mlflow_ui"


def free_port() -> int:
    """A loopback port nothing listens on (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True if a server could listen on ``port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def call(url: str, body: dict | None = None) -> dict:
    """GET ``url``, or POST ``body`` as JSON; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def wait_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow ui exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow ui not healthy after {STARTUP_S} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (its workers too); kill it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        proc.wait(timeout=20)


def start_ui(cwd: Path, port: int, log: Path) -> subprocess.Popen:
    """The README's command (plain ``mlflow ui``: MLflow's default store in ``cwd``), on
    ``port``, with one worker, in its own session."""
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui"]
            + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root) -> tuple[Path, subprocess.CompletedProcess]:
    """The three variants, trained tiny in one multirun, in a fresh folder."""
    cwd = tmp_path_factory.mktemp("ui_runs")
    res = run_train(
        cwd,
        "-m",
        f"model={','.join(VARIANTS)}",
        "debug=tiny",
        f"data.root={demo_root}",
        "callbacks.system_metrics.sampling_interval=0.2",
        timeout=1200,  # three jobs; a busy 2-core machine is slow
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd, res


@pytest.fixture(scope="module")
def ui(trained):
    """``mlflow ui`` over the trained runs: yields its base URL; stopped by PID afterwards."""
    cwd, _ = trained
    port, log = free_port(), cwd / "ui.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_ui(cwd, port, log)
    try:
        wait_healthy(proc, base, log)
        yield base
    finally:
        stop(proc)
    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)  # a worker may outlive its parent by a moment
    assert port_is_free(port), f"port {port} still taken after stopping mlflow ui"


def runs_by_variant(base: str) -> tuple[dict, dict[str, dict]]:
    """The experiment and its runs (REST API), keyed by variant."""
    api = f"{base}/api/2.0/mlflow"
    exp = call(f"{api}/experiments/get-by-name?experiment_name=tumorseg")["experiment"]
    found = call(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    runs = {}
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        runs[tags["variant"]] = run
    return exp, runs


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"]["metrics"]}


def test_plain_mlflow_ui_serves_runs_datasets_and_system_metrics(trained, ui):
    _, res = trained
    exp, runs = runs_by_variant(ui)
    assert sorted(runs) == sorted(VARIANTS)
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    for variant, run in runs.items():
        assert run["info"]["status"] == "FINISHED", variant
        values = metrics(run)
        assert 0.0 <= values["val/dice_mean"] <= 1.0 and "test/dice_wt" in values
        # the system metrics monitor sampled CPU and memory while it trained
        assert "system/cpu_utilization_percentage" in values, sorted(values)
        assert values["system/system_memory_usage_megabytes"] > 0
        inputs = run["inputs"]["dataset_inputs"]
        contexts = {
            t["value"]: i["dataset"]
            for i in inputs
            for t in i["tags"]
            if t["key"].endswith("context")
        }
        assert sorted(contexts) == ["test", "training", "validation"], variant
        run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        for context, dataset in contexts.items():
            assert dataset["name"] == "demo", context
            assert json.loads(dataset["profile"])["data_manifest"] == run_tags["data_manifest"]
        assert len({d["digest"] for d in contexts.values()}) == 3  # each split its own data

    run_id = runs["unet"]["info"]["run_id"]
    api = f"{ui}/api/2.0/mlflow"
    files = call(f"{api}/artifacts/list?run_id={run_id}")["files"]
    assert "val_preview.png" in {f["path"] for f in files}
    query = urllib.parse.urlencode({"path": "val_preview.png", "run_uuid": run_id})
    with urllib.request.urlopen(f"{ui}/get-artifact?{query}", timeout=30) as resp:
        assert resp.read(8) == b"\x89PNG\r\n\x1a\n"  # the UI can show the preview

    # the console: no adverts, no demo bar (the demo set was complete), each job's run link
    # at its start and its end
    out = res.stdout + res.stderr
    assert "💡" not in out and "Synthesising" not in out
    for run in runs.values():
        rid = run["info"]["run_id"]
        assert len(re.findall(rf"MLflow run {rid} in experiment 'tumorseg': http", out)) == 2


# ---------------------------------------------------------------- the browser


@pytest.fixture
def browser():
    """Headless Chromium; skipped where it is not installed (failed where CI requires it)."""
    try:
        driver = mlflow_browser.chromium()
    except mlflow_browser.BrowserMissing as err:
        if os.environ.get("TUMORSEG_REQUIRE_BROWSER"):
            pytest.fail(f"{err}, and TUMORSEG_REQUIRE_BROWSER is set")
        pytest.skip(str(err))
    try:
        yield driver
    finally:
        mlflow_browser.save(driver, SHOTS / "last_page.png")  # where it stopped, pass or fail
        driver.quit()


def test_runs_table_and_compare_view_in_chromium(trained, ui, browser):
    _, res = trained
    exp, runs = runs_by_variant(ui)
    ids = {run["info"]["run_id"]: variant for variant, run in runs.items()}

    # the runs table, at the URL the project gives for it (port aside): the three runs with
    # their val/dice_mean and their training data
    rows = mlflow_browser.show_runs_table(
        browser, ui, exp["experiment_id"], len(VARIANTS), ["val/dice_mean"]
    )
    assert set(rows) == set(ids)
    for run_id, row in rows.items():
        run = runs[ids[run_id]]
        assert row[mlflow_browser.NAME_COL].splitlines()[-1] == run["info"]["run_name"]
        shown = float(row[mlflow_browser.metric_col("val/dice_mean")])
        assert shown == pytest.approx(metrics(run)["val/dice_mean"], rel=1e-6, abs=1e-9)
        training = [
            i["dataset"]["digest"]
            for i in run["inputs"]["dataset_inputs"]
            if {"key": "mlflow.data.context", "value": "training"} in i["tags"]
        ]
        dataset = row[mlflow_browser.DATASET_COL]
        assert f"demo ({training[0]})" in dataset and "Training" in dataset
        assert row[mlflow_browser.MODELS_COL].strip() not in ("", "-")  # its logged model
    mlflow_browser.save(browser, SHOTS / "runs_table.png")

    # the compare view of the three runs, from the table's selection
    compared = mlflow_browser.compare_all(browser, VARIANTS)
    assert sorted(compared) == sorted(ids)
    # its parallel-coordinates plot opens on what the multirun varied (the variant) and the
    # objective, not on run-specific params (checkpoint folders) or the learning rate
    params, metrics_shown = mlflow_browser.plot_axes(browser)
    assert params and all(p.startswith("model.") for p in params), params
    assert "model.name" in params, params
    assert metrics_shown == ["val/dice_mean"], metrics_shown
    mlflow_browser.save(browser, SHOTS / "compare_runs.png")

    # the run link train.py printed last opens that run's page
    from selenium.webdriver.common.by import By

    out = res.stdout + res.stderr
    link = re.findall(r"MLflow run \w+ in experiment 'tumorseg': (\S+)", out)[-1]
    run_id = link.split("/runs/")[1].split("?")[0]
    mlflow_browser.open_page(browser, link.replace(tracking.UI_URL, ui))
    mlflow_browser.wait_for(
        browser,
        lambda b: ids[run_id] in [h.text for h in b.find_elements(By.TAG_NAME, "h2")],
        f"the page of run {run_id}",
    )
    mlflow_browser.save(browser, SHOTS / "run_page.png")
