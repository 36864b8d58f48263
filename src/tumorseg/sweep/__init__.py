"""Sweeps: Optuna studies and multiruns of training jobs, on devices and clusters.

- :mod:`.study`: an Optuna study whose trials are Hydra jobs (what the ``tumorseg_optuna``
  sweeper runs): reserving, asking and telling trials, the baseline, the summary;
- :mod:`.space`: the search space, Hydra's override grammar <-> Optuna distributions, and the
  config's own values in it;
- :mod:`.trials`: how a job ended, a trial's folds, keeping every slot busy (async or batch),
  slot utilisation;
- :mod:`.liveness`: heartbeats, trials of dead workers failed and retried;
- :mod:`.pool`: the device pool of parallel jobs (and ``POOL_ENV``);
- :mod:`.runners`: jobs in fresh processes on devices of the pool, or through a Hydra launcher;
  plain multiruns on the pool (what the ``tumorseg_pool`` launcher runs);
- :mod:`.runs`: a study's MLflow runs, the pruning callback, summaries;
- :mod:`.objective`: what a job returns, the objective and its standard error;
- :mod:`.launch`: how a job's processes start (DDP children, devices tag, the local MLflow store).

The Hydra plugins in ``hydra_plugins/`` (``tumorseg_optuna_sweeper``, ``tumorseg_pool_launcher``)
are thin shells over this package, which never imports them.

May import ``tumorseg.tracking`` and the packages below it.
"""
