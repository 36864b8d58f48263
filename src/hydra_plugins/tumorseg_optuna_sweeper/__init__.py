"""Hydra sweeper plugin running an Optuna study over Hydra jobs (``hydra/sweeper=tumorseg_optuna``).

A Hydra shell over :mod:`tumorseg.sweep` (the study: :mod:`tumorseg.sweep.study`). Hydra finds it
through the ``hydra_plugins`` namespace package: ``config.py`` registers the config,
``sweeper.py`` holds :class:`~.sweeper.OptunaSweeper`. Written for current Optuna (the official
``hydra-optuna-sweeper`` pins ``optuna<3``), with the same config surface.
"""
