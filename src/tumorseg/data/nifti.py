"""The name of :mod:`tumorseg.data.case` before the packages by stage, kept for the MLflow
models logged by tumorseg 0.1 (their stored code imports ``Case`` from here). Remove after
one release."""

from tumorseg.data.case import Case

__all__ = ["Case"]
