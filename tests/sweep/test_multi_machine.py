"""Several machines, on this one: sweep workers that share nothing but a PostgreSQL storage URL
and an MLflow tracking server (PostgreSQL backend, proxied artifacts).

A real PostgreSQL server (Debian's, run as the ``postgres`` OS user when the tests run as root)
and a real ``mlflow server`` start on free loopback ports in a temporary folder and are stopped
by PID. The password is in neither URL: the workers and the server read ``PGPASSWORD``. Without
the server binaries the tests skip, or fail where ``TUMORSEG_REQUIRE_POSTGRES`` is set (CI).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import ONE_THREAD, ROOT

pytestmark = pytest.mark.slow

USER, PASSWORD = "tumorseg", "s3cret-not-in-urls"
STARTUP_S = 120  # mlflow server imports slowly on a busy 2-core machine
TINY = ["debug=tiny", "test=false", "trainer.max_epochs=1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Services:
    storage: str  # Optuna storage URL, no password
    checker: str  # the same with the password, for this test's own look at the study
    tracking: str  # MLflow tracking server
    env: dict[str, str]  # PGPASSWORD for the workers


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[int, dict[str, str]]]:
    """A PostgreSQL server on a free port, in a temporary folder, with databases optuna and
    mlflow; yields its port and the environment that holds the password."""
    bindir = pg_bin()
    if bindir is None:
        why = "no PostgreSQL server binaries (initdb); apt-get install postgresql"
        if os.environ.get("TUMORSEG_REQUIRE_POSTGRES"):
            pytest.fail(f"{why}, and TUMORSEG_REQUIRE_POSTGRES is set")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="tumorseg-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    (root / "pw").write_text(PASSWORD + "\n")
    if as_postgres:
        shutil.chown(root / "pw", "postgres", "postgres")
    port, data = free_port(), root / "data"

    def pg(tool: str, *args: str, **kw) -> subprocess.CompletedProcess:
        cmd = [*as_postgres, str(bindir / tool), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)

    res = pg("initdb", "-D", str(data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={root}/pw")
    assert res.returncode == 0, res.stderr
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    res = pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")
    assert res.returncode == 0, res.stderr + (root / "log").read_text()
    env = {"PGPASSWORD": PASSWORD}
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres"
        ) as conn:
            conn.autocommit = True
            conn.execute("CREATE DATABASE optuna")
            conn.execute("CREATE DATABASE mlflow")
        yield port, env
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def services(postgres, tmp_path_factory) -> Iterator[Services]:
    """An MLflow tracking server on the PostgreSQL database mlflow, proxying artifacts to a
    folder, and the Optuna storage URL of database optuna."""
    port, env = postgres
    tmp = tmp_path_factory.mktemp("mlflow-server")
    http = free_port()
    log = tmp / "server.log"
    server_env = {**os.environ, **env}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server"]
            + ["--backend-store-uri", f"postgresql+psycopg://{USER}@127.0.0.1:{port}/mlflow"]
            + ["--artifacts-destination", (tmp / "artifacts").as_uri(), "--serve-artifacts"]
            + ["--host", "127.0.0.1", "--port", str(http), "--workers", "1"],
            cwd=tmp,
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"mlflow server not up: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        url = f"postgresql+psycopg://{USER}@127.0.0.1:{port}/optuna"
        checker = url.replace(f"{USER}@", f"{USER}:{PASSWORD}@")
        yield Services(url, checker, base, env)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # its workers linger on SIGTERM; nothing here needs a clean exit
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def start_worker(cwd: Path, svc: Services, demo_root: Path, *extra: str) -> subprocess.Popen:
    """One sweep worker, as on its own machine: own working folder, the two URLs, PGPASSWORD."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **svc.env, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna", *TINY]
    cmd += [f"data.root={demo_root}", f"hydra.sweeper.storage={svc.storage}"]
    cmd += [f"logger.mlflow.tracking_uri={svc.tracking}", *extra]
    log = open(cwd / "worker.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(worker: subprocess.Popen, cwd: Path, timeout: float = 300) -> None:
    worker.wait(timeout=timeout)
    assert worker.returncode == 0, (cwd / "worker.log").read_text()[-4000:]


def test_two_workers_share_postgres_and_mlflow_server(services, demo_root, tmp_path):
    n = 3
    beat = ["hydra.sweeper.heartbeat_interval=2", "hydra.sweeper.grace_period=8"]
    trials = f"hydra.sweeper.n_trials={n}"
    workers = [
        start_worker(tmp_path / f"machine{i}", services, demo_root, *beat, f"seed={i}", trials)
        for i in range(2)
    ]
    for i, w in enumerate(workers):  # started together on a fresh database: both must work
        finish(w, tmp_path / f"machine{i}")
    storage = optuna.storages.RDBStorage(services.checker)
    study = optuna.load_study(study_name="tumorseg-unet", storage=storage)
    trials = study.trials
    states = [t.state for t in trials]
    # exactly n: a worker counts the study and creates its trial under the study's lock
    assert states == [TrialState.COMPLETE] * n
    by_machine = {Path(t.user_attrs["sweep_dir"]).parts[-4] for t in trials}
    assert by_machine == {"machine0", "machine1"}  # each worker ran at least one trial

    client = MlflowClient(tracking_uri=services.tracking)
    exp = client.get_experiment_by_name("tumorseg")
    runs = client.search_runs([exp.experiment_id], "tags.optuna_study = 'tumorseg-unet'")
    (parent,) = [r for r in runs if r.data.tags.get("optuna_parent") == "true"]
    trial_runs = {r.info.run_id: r for r in runs if "optuna_trial" in r.data.tags}
    assert sorted(trial_runs) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    for t in trials:
        run = trial_runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["optuna_state"] == "COMPLETE"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics["val/dice_mean"] == pytest.approx(t.value)
        # artifacts come back through the server (proxied), not from a shared folder
        dst = tmp_path / "download" / run.info.run_id
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(dst)))
        assert "optimizer" in config.read_text()
        (ckpt,) = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]
        state = torch.load(
            client.download_artifacts(run.info.run_id, ckpt, str(dst)), weights_only=False
        )
        assert state["state_dict"]
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)

    # a worker killed in the middle of a trial: the other one fails it once its heartbeat
    # stops, ends its MLflow run FAILED, and runs it again
    study_name = ["hydra.sweeper.study_name=killed", "hydra.sweeper.n_trials=2"]
    victim = start_worker(tmp_path / "victim", services, demo_root, *beat, *study_name)
    other = start_worker(tmp_path / "other", services, demo_root, *beat, *study_name, "seed=5")
    deadline = time.monotonic() + 240
    while True:
        assert victim.poll() is None, (tmp_path / "victim" / "worker.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the victim never started training a trial"
        try:
            killed = optuna.load_study(study_name="killed", storage=storage)
            mine = [
                t
                for t in killed.get_trials(states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                and "mlflow_run_id" in t.user_attrs
            ]
        except KeyError:  # the study does not exist yet
            mine = []
        if mine:
            break
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finish(other, tmp_path / "other")

    trials = optuna.load_study(study_name="killed", storage=storage).trials
    (dead,) = [t for t in trials if t.number == mine[0].number]
    assert dead.state == TrialState.FAIL
    assert dead.user_attrs["fail_reason"].startswith("stale: no heartbeat")
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2  # the study is full
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params
    run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"
