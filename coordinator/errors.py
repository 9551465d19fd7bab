"""The coordinator's errors, in one module.

The domain modules raise ``CoordinatorError`` subclasses; only
``coordinator/servicer.py`` turns them into gRPC status codes. Their messages
go back to the caller, so they name the offending field and never contain a
secret. ``ConfigError`` stops the process at start and is never sent to a
caller, so it stands apart from that hierarchy.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator reports to a caller on purpose."""


class InvalidArgument(CoordinatorError):
    """A request field is missing or malformed; retrying the same call cannot succeed."""


class LeaseLost(CoordinatorError):
    """The caller's lease token is not the current one for the key.

    The lease expired and may have been granted to someone else since: the
    stale holder must not register content or move a tag (fencing).
    """


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed; the message names the key."""
