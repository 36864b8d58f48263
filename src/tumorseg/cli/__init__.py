"""The command-line tools: thin modules (``predict``, ``evaluate``, ``report``, ``prepare``,
``channels``, ``demo``, ``export``, ``register``, ``bench``) over library code.

May import every other package; nothing imports ``tumorseg.cli``. What the tools share
(argument errors, progress bar) is :mod:`tumorseg.core.console`.
"""
