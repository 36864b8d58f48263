"""Hydra launcher for plain multiruns on a device pool (``hydra/launcher=tumorseg_pool``).

Jobs run ``n_jobs`` at a time, each in a fresh process on its own devices; see
:mod:`hydra_plugins.tumorseg_optuna_sweeper.pool`, which the Optuna sweeper uses too.
"""
