"""The errors of ``shoal warm``, shared by its modules; ``warm.py`` turns them into the run's results."""

from __future__ import annotations


class WarmError(Exception):
    """One image could not be warmed; the message says what failed."""


class Stopped(WarmError):
    """A transfer given up because another one failed, or on Ctrl-C; not a failure of its own."""
