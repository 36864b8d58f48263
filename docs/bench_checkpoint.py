"""A checkpoint of the default model config (random weights) and a folder of demo cases, for
docs/bench_predict.sh: ``python docs/bench_checkpoint.py /tmp/speed/pb 4``."""

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tumorseg.config import CONF_DIR
from tumorseg.data.demo import write_demo

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
    cfg = compose("train")
torch.manual_seed(0)
module = instantiate(cfg.model)
config = {
    "model": OmegaConf.to_container(cfg.model, resolve=True),
    "data": OmegaConf.to_container(cfg.data, resolve=False),
}
module.config = config
# "compile" is new: left out, so that the code before it can read the checkpoint too
config["model"].pop("compile", None)
torch.save(
    {
        "state_dict": module.state_dict(),
        "tumorseg_config": config,
        "tumorseg_preprocessing": module.preprocessing.to_dict(),
    },
    out / "default.ckpt",
)
write_demo(out / "cases", cases=int(sys.argv[2]), seed=0, progress=False)
print("ok")
