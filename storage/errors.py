"""The project's error for unusable data: its message names the file and the problem."""

from __future__ import annotations


class DataError(ValueError):
    """A data file that cannot be used as a whole; the message names the file and the problem."""
