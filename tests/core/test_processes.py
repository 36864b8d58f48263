"""A process pool's workers stop when the process that made them is killed, instead of
finishing their cases for no one and then waiting on their queue forever."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ONE_THREAD

WRITE_DEMO = "from tumorseg.data.demo import write_demo; write_demo({out!r}, 12, workers=2)"
PREPARE = (
    "from tumorseg.data.prepare import prepare; "
    "prepare({src!r}, {out!r}, workers=2, progress=False)"
)


def workers_of(proc: subprocess.Popen, timeout: float = 60) -> list[psutil.Process]:
    """The pool workers of ``proc`` once both have started."""
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = parent.children()
        if len(children) >= 2:
            return children
        assert proc.poll() is None, "the process ended before its pool started"
        time.sleep(0.05)
    raise AssertionError("no pool workers started")


@pytest.mark.parametrize("code", [WRITE_DEMO, PREPARE], ids=["write_demo", "prepare"])
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path: Path, demo_root: Path, code):
    script = code.format(out=str(tmp_path / "out"), src=str(demo_root))
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    workers: list[psutil.Process] = []
    try:
        workers = workers_of(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} pool workers still run after their parent was killed"
    finally:
        proc.kill()
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
