"""Pooled validation metrics do not depend on the number of DDP processes.

Lightning's distributed sampler pads the last batch by repeating up to ``world_size - 1``
samples; counted twice, they would shift every pooled Dice. Two gloo processes must give the
numbers one process gives on the same data and weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, ROOT

pytestmark = pytest.mark.slow

KEYS = ("val/dice_wt", "val/dice_tc", "val/dice_et", "val/dice_mean", "val/iou_wt", "val/acc_wt")


def validate(demo_root: Path, work: Path, devices: int) -> dict[str, float]:
    out = work / f"metrics_{devices}.json"
    env = {**os.environ, **ONE_THREAD, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "ddp_validate.py"),
            str(demo_root),
            str(work),
            str(devices),
            str(out),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # seconds of CPU are few; a loaded machine stretches them
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_pool_the_same_validation_metrics(tmp_path, demo_root):
    one = validate(demo_root, tmp_path, 1)
    # the padding only happens when the slices do not split evenly: the case this guards
    assert one["val_slices"] % 2 == 1, one["val_slices"]
    two = validate(demo_root, tmp_path, 2)
    for key in KEYS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), (key, one[key], two[key])
