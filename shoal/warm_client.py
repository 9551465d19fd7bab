"""The cluster as a registry, as ``shoal warm`` reads it: manifests and blobs, checked against their digests.

``RegistryClient`` speaks the read side of the distribution API over one
``httpx.Client`` whose base URL is a node or the load balancer in front of
the nodes; the caller owns the client and closes it. Every request for an
image carries the image's ``ns`` parameter (``Reference.params``), and the
manifest requests ``ACCEPT_MANIFESTS``.

Every failure raises ``WarmError`` naming what failed and why, with the OCI
error code when the cluster sent one: ``manifest v1: 404 MANIFEST_UNKNOWN:
manifest unknown``, ``blob sha256:...: the bytes do not match the digest``.
Digests of an algorithm Shoal cannot verify (``node.reference.ALGORITHMS``)
pass unchecked.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import httpx

from node.media_types import ACCEPT_MANIFESTS
from node.reference import ALGORITHMS, DIGEST
from shoal.errors import Stopped, WarmError
from shoal.warm_plan import Blob, Reference
from shoal.warm_progress import Progress

# A manifest bigger than this is not a manifest (distribution refuses 4 MiB).
_MANIFEST_MAX = 4 * 1024 * 1024
_CHUNK = 256 * 1024


class RegistryClient:
    """Reads manifests and blobs from one cluster URL; the download threads of a run share it."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def reachable(self) -> str | None:
        """None when the URL answers the registry API's base endpoint, else why not."""
        try:
            response = self.http.get("/v2/")
        except httpx.HTTPError as exc:
            return str(exc) or type(exc).__name__
        if response.status_code not in (200, 401):
            return f"GET /v2/ answered {_describe_error(response)}"
        return None

    def manifest(self, ref: Reference, reference: str) -> tuple[str, dict[str, Any]]:
        """The media type and the JSON object of ``ref``'s manifest ``reference`` (a tag or digest)."""
        url = f"/v2/{ref.name}/manifests/{reference}"
        try:
            response = self.http.get(url, params=ref.params, headers={"Accept": ACCEPT_MANIFESTS})
        except httpx.HTTPError as exc:
            raise WarmError(f"manifest {reference}: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise WarmError(f"manifest {reference}: {_describe_error(response)}")
        if len(response.content) > _MANIFEST_MAX:
            raise WarmError(f"manifest {reference}: larger than {_MANIFEST_MAX} bytes")
        if DIGEST.fullmatch(reference):
            _check_digest(reference, response.content)
        try:
            document = json.loads(response.content)
        except ValueError:
            raise WarmError(f"manifest {reference}: not JSON") from None
        if not isinstance(document, dict):
            raise WarmError(f"manifest {reference}: not a JSON object")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip() or str(
            document.get("mediaType", "")
        )
        return media_type, document

    def download(self, ref: Reference, blob: Blob, progress: Progress, stop: threading.Event) -> None:
        """Read ``blob`` to its end and drop the bytes, checking its size and digest.

        Each chunk is reported to ``progress.advance``. Once ``stop`` is set
        the download gives up at its next chunk with ``Stopped``; the
        response is closed however it ends.
        """
        # A plan's digests match the grammar, so they hold exactly one colon.
        algorithm, _, expected = blob.digest.partition(":")
        hasher = hashlib.new(algorithm) if algorithm in ALGORITHMS else None
        received = 0
        try:
            with self.http.stream("GET", f"/v2/{ref.name}/blobs/{blob.digest}", params=ref.params) as response:
                if response.status_code != 200:
                    response.read()
                    raise WarmError(f"blob {blob.digest}: {_describe_error(response)}")
                for chunk in response.iter_bytes(_CHUNK):
                    if stop.is_set():
                        raise Stopped(f"blob {blob.digest}: stopped")
                    if hasher is not None:
                        hasher.update(chunk)
                    received += len(chunk)
                    progress.advance(len(chunk))
        except httpx.HTTPError as exc:
            raise WarmError(f"blob {blob.digest}: {exc or type(exc).__name__} after {received} bytes") from None
        if blob.size and received != blob.size:
            raise WarmError(f"blob {blob.digest}: got {received} bytes, the manifest says {blob.size}")
        if hasher is not None and hasher.hexdigest() != expected:
            raise WarmError(f"blob {blob.digest}: the bytes do not match the digest")


def _describe_error(response: httpx.Response) -> str:
    """``404 MANIFEST_UNKNOWN: manifest unknown`` from an OCI error body, else the status."""
    text = f"{response.status_code} {response.reason_phrase}".strip()
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return f"{response.status_code} {first.get('code', '')}: {first.get('message', '')}".strip()
    except (ValueError, AttributeError, IndexError, TypeError):
        return text


def _check_digest(digest: str, data: bytes) -> None:
    """Check a manifest asked for by a digest of a verifiable algorithm (others pass unchecked)."""
    algorithm, _, expected = digest.partition(":")
    if algorithm in ALGORITHMS and hashlib.new(algorithm, data).hexdigest() != expected:
        raise WarmError(f"manifest {digest}: the bytes do not match the digest")
