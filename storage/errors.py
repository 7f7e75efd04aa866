"""The project's errors about what a user gave it: each message names the file or folder
and the problem, and the command line reports them as one line (exit status 2)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file that cannot be used as a whole; the message names the file and the problem."""


class HomeError(ValueError):
    """A home folder that cannot hold the stages (a file, not writable)."""
