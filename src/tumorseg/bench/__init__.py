"""Benchmarks behind ``tumorseg-bench <what>`` (:mod:`tumorseg.cli.bench`), each measured
against a baseline in the same run: training throughput (:mod:`.training`), the training step
layer by layer (:mod:`.layers`), ``torch.compile`` (:mod:`.compile`), the data loader
(:mod:`.data`), inference on one case (:mod:`.inference`), ``tumorseg-predict`` start-up and
folders (:mod:`.startup`, :mod:`.pipeline`), scoring (:mod:`.scoring`) and export
(:mod:`.export`).

May import every package but ``tumorseg.cli``.
"""
