"""Hydra launcher for plain multiruns on a device pool (``hydra/launcher=tumorseg_pool``).

A Hydra shell over :func:`tumorseg.sweep.runners.run_multirun`: jobs run ``n_jobs`` at a time,
each in a fresh process on its own devices of the pool (:mod:`tumorseg.sweep.pool`), which the
Optuna sweeper uses too.
"""
