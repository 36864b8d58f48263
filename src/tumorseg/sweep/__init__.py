"""Sweeps: a study's MLflow runs and summaries (:mod:`.runs`), the objective and its standard
error (:mod:`.objective`) and launching jobs on devices and clusters (:mod:`.launch`). The
Hydra plugins in ``hydra_plugins/`` are thin shells over this package.

May import ``tumorseg.tracking`` and the packages below it.
"""
