"""Errors for bad user input: the message names the file and the problem."""


class DataError(ValueError):
    """Bad input data (unreadable file, missing modality, wrong geometry, ...)."""
