"""Reports: comparing runs and variants from MLflow (:mod:`.compare`, which ties together
reading the runs, :mod:`.runs`; the statistics, :mod:`.stats`; the Markdown, :mod:`.render`;
and the figures, :mod:`.figures`) and a study's report, the winner against the baseline on the
same cases (:mod:`.study`).

May import ``tumorseg.sweep`` and the packages below it.
"""
