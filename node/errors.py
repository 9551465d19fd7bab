"""Errors raised by the node's stores and clients.

Stores and clients raise these domain errors; one Flask handler in
``node.api`` renders every one of them as an OCI error body
(``{"errors": [{"code", "message", "detail"}]}``) using the ``code`` and
``status`` each class carries. Nothing else in the node builds error bodies.
"""

from __future__ import annotations

import errno


class ShoalError(Exception):
    """Base of every error the node answers a client with."""

    code = "UNKNOWN"
    status = 500
    # Seconds a client should wait before trying again (a Retry-After header).
    retry_after: int | None = None
    # True when the failure holds for the whole cluster: a fetch given up
    # with it tells its followers on other nodes to fail too (``node.flight``).
    for_the_cluster = False

    def __init__(self, message: str, detail: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Busy(ShoalError):
    """A ceiling of the node was reached (fill slots); the client should try again shortly."""

    code, status = "UNAVAILABLE", 503
    retry_after = 1


class NoRoom(Busy):
    """The cache's disk is full, or a write would leave less than ``cache.min_free`` free.

    The sweep is woken to evict; the client should try again shortly.
    """


def is_disk_full(error: OSError) -> bool:
    """The filesystem (or the user's quota, or RLIMIT_FSIZE) has no room for the write."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NameInvalid(ShoalError):
    code, status = "NAME_INVALID", 400


class DigestInvalid(ShoalError):
    code, status = "DIGEST_INVALID", 400


class TagInvalid(ShoalError):
    # The OCI spec has no code of its own for a malformed tag; distribution
    # answers MANIFEST_INVALID there, and so do we.
    code, status = "MANIFEST_INVALID", 400


class PaginationInvalid(ShoalError):
    code, status = "PAGINATION_NUMBER_INVALID", 400


class RangeInvalid(ShoalError):
    code, status = "RANGE_INVALID", 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class Unsupported(ShoalError):
    code, status = "UNSUPPORTED", 405


class NameUnknown(ShoalError):
    code, status = "NAME_UNKNOWN", 404


class RegistryUnknown(ShoalError):
    """The request names a registry this mirror does not mirror.

    404, so that containerd falls back to the registry itself.
    """

    code, status = "NAME_UNKNOWN", 404


class BlobUnknown(ShoalError):
    code, status = "BLOB_UNKNOWN", 404


class ManifestUnknown(ShoalError):
    code, status = "MANIFEST_UNKNOWN", 404


class NotFound(ShoalError):
    """A path that is not part of the registry API."""

    code, status = "NOT_FOUND", 404


class UpstreamUnavailable(ShoalError):
    """The upstream could not be reached, timed out or answered 5xx.

    The message never carries credentials: it names the upstream by its
    public URL and says what went wrong.
    """

    code, status = "UPSTREAM_UNAVAILABLE", 503


class UpstreamTooSlow(UpstreamUnavailable):
    """The upstream sent a blob slower than ``upstream.min_rate`` (``node.min_rate``).

    The transfer was aborted; a fill that was carrying it on from a peer
    gives up too (``for_the_cluster``) instead of asking the same upstream
    again.
    """

    # The reason holds for every node of the cluster, not just this one.
    for_the_cluster = True


class UpstreamDenied(ShoalError):
    """The upstream refused Shoal's credentials (401/403 after auth)."""

    code, status = "DENIED", 403


class TooManyRequests(ShoalError):
    code, status = "TOOMANYREQUESTS", 429


class UpstreamInvalid(ShoalError):
    """The upstream sent content that does not match its digest or limits."""

    code, status = "UPSTREAM_INVALID", 502


class BadCopy(UpstreamInvalid):
    """A copy from another node did not match its digest; the source reported it and avoids it now.

    Raised by a source (``node.cluster_source``) as its context is left
    with the verification's ``UpstreamInvalid``: opening the content again
    goes to another holder or the upstream, so the fill tries again.
    """
