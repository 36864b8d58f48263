"""Benchmarks, each measured against a baseline in the same run: training throughput
(``training``), the data loader (``data``) and inference (``inference``)."""
