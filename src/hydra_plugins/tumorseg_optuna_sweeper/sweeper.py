"""The ``tumorseg_optuna`` sweeper: a Hydra shell over :mod:`tumorseg.sweep.study`.

:class:`OptunaSweeper` is what Hydra instantiates for ``hydra/sweeper=tumorseg_optuna``
(``hparams_search=optuna``): it takes the ``hydra.sweeper`` settings, Hydra's launcher and the
sweep's overrides, and hands them to :class:`tumorseg.sweep.study.StudySweep`, which runs the
Optuna study (search space, device pool, trials in flight, heartbeats, MLflow; see there).

No ``from __future__ import annotations``: Hydra's scan runs this module before it is in
``sys.modules``, where string annotations break dataclasses. Hydra's scan also runs it again
(its module-level objects are not the ones an ``import`` gets), so it holds no library logic.
"""

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

from hydra_plugins.tumorseg_optuna_sweeper.config import OptunaSweeperConf
from tumorseg.sweep.space import param_lines
from tumorseg.sweep.study import StudySweep

__all__ = ["OptunaSweeper", "OptunaSweeperConf"]


class OptunaSweeper(Sweeper):
    """Runs ``n_trials`` Hydra jobs in all as trials of an Optuna study; the keyword arguments
    are the fields of :class:`~.config.OptunaSweeperConf` (see :class:`StudySweep`)."""

    def __init__(self, **settings: Any) -> None:
        self.study = StudySweep(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.study.setup(config, hydra_context, task_function, launcher)

    def sweep(self, arguments: list[str]) -> list[FrozenTrial]:
        parser = OverridesParser.create(config_loader=self.study.hydra_context.config_loader)
        return self.study.run(parser.parse_overrides([*param_lines(self.study.params), *arguments]))
