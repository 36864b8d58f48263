"""A tiny Hydra app for sweeper tests: its job sleeps ``duration`` seconds (pruned at once below
``prune_below``) and returns a Score (``objectives: 2``: two values). No training, no MLflow.

Run as a script (``python tests/sweep_app/app.py -m ...``), as train.py is: launchers that
pickle the task function then carry it by value.
"""

import time

import hydra
from omegaconf import DictConfig

from tumorseg.sweep.objective import Score


@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg: DictConfig) -> object:
    if cfg.prune_below is not None and cfg.duration < cfg.prune_below:
        import optuna

        time.sleep(0.1)
        raise optuna.TrialPruned(f"duration {cfg.duration:.2f} < {cfg.prune_below}")
    time.sleep(cfg.duration)
    value = Score(cfg.x + cfg.value_per_fold * (cfg.data.fold or 0), cfg.stderr, "x")
    if cfg.objectives == 2:
        return [value, Score(cfg.duration, None, "duration")]
    return value


if __name__ == "__main__":
    main()
