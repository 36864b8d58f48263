"""Errors for bad user input: the message names the file and the problem."""


class DataError(ValueError):
    """Bad input data (unreadable file, missing modality, wrong geometry, ...)."""


def first_line(err: BaseException) -> str:
    """An exception as one short line."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
