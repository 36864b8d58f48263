"""Training: the Lightning module (:mod:`.module`), its losses, the pooled training scores
(:mod:`.scores`), precision and channels-last (:mod:`.precision`) and Lightning-free checkpoint
reading (:mod:`.checkpoint`).

May import ``tumorseg.data``, ``tumorseg.models`` and ``tumorseg.core``.
"""
