"""Evaluation: distance and lesion-wise BraTS metrics (:mod:`.lesions`), per-case scores and
their tables (:mod:`.cases`), box plots of case scores (:mod:`.figures`), finding and pairing
reference files (:mod:`.references`) and the training run's test stage (:mod:`.test_stage`).

May import ``tumorseg.inference`` and the packages below it; not ``tumorseg.tracking``.
"""
