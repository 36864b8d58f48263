"""The documented ``mlflow ui`` command serves what ``train.py`` logs, through its REST API."""

from __future__ import annotations

import json
import os
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

from tests.conftest import run_train

pytestmark = pytest.mark.slow

STARTUP_S = 90  # the server imports slowly on a busy 2-core machine


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
    """The README's command, with one worker, in its own session."""
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui"]
            + ["--backend-store-uri", "sqlite:///mlruns/mlflow.db"]
            + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_mlflow_ui_serves_run_metrics_and_artifacts(tmp_path, demo_root):
    res = run_train(tmp_path, "debug=tiny", f"data.root={demo_root}")
    assert res.returncode == 0, res.stderr[-3000:]

    port, log = free_port(), tmp_path / "ui.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_ui(tmp_path, port, log)
    try:
        wait_healthy(proc, base, log)
        api = f"{base}/api/2.0/mlflow"
        exp = call(f"{api}/experiments/get-by-name?experiment_name=tumorseg")["experiment"]
        found = call(
            f"{api}/runs/search",
            {"experiment_ids": [exp["experiment_id"]], "filter": "tags.variant = 'unet'"},
        )
        assert len(found["runs"]) == 1
        run = found["runs"][0]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert 0.0 <= metrics["val/dice_mean"] <= 1.0 and "test/dice_wt" in metrics

        run_id = run["info"]["run_id"]
        files = call(f"{api}/artifacts/list?run_id={run_id}")["files"]
        assert "val_preview.png" in {f["path"] for f in files}
        query = urllib.parse.urlencode({"path": "val_preview.png", "run_uuid": run_id})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as resp:
            assert resp.read(8) == b"\x89PNG\r\n\x1a\n"  # the UI can show the preview
    finally:
        stop(proc)

    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)  # a worker may outlive its parent by a moment
    assert port_is_free(port), f"port {port} still taken after stopping mlflow ui"
