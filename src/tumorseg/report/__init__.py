"""Reports: comparing runs and variants from MLflow (:mod:`.compare`) and a study's report,
the winner against the baseline on the same cases (:mod:`.study`).

May import ``tumorseg.sweep`` and the packages below it.
"""
