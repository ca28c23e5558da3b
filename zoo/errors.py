"""Errors raised by :mod:`zoo` for bad user input (the CLI prints them on one line, exit code 2)."""


class ZooError(Exception):
    """A zoo entry is invalid or unknown, or its weights cannot be found."""


class DataError(ZooError):
    """A data source is missing, unreadable or malformed."""
