"""OmegaConf resolvers used by the configs in ``conf/``; import before composing."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from tumorseg.core.labels import target
from tumorseg.tracking.client import project_root

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

for _name, _fn in {
    "out_channels": lambda name: target(name).channels,  # ${out_channels:regions} -> 3
    "cwd": os.getcwd,
    "project_root": lambda: str(project_root()),  # tracking.project_root
}.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
