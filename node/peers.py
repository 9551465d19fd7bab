"""Moving content between the nodes of a cluster.

Each node serves its content to the others at an internal endpoint,
``GET /internal/v1/content/<digest>``: complete content with sendfile, or a
fill in progress by following its growing file, so a node on the other side
of the cluster gets the first bytes of a layer while it is still arriving
from the upstream. The endpoint never starts a fetch of its own (a peer asks
only the node the coordinator named), and it answers only callers that
present the cluster secret.

``PeerClient`` is the other side: ``open`` streams a blob from a peer and
``fetch`` copies a manifest, with the context contract of ``node.sources``.
The receiving node verifies the digest like any other fill.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator

import httpx
from flask import Blueprint, Response, request

from node.errors import BlobUnknown, ShoalError, UpstreamUnavailable
from node.reference import parse_digest
from node.responses import file_body, growing_body
from node.services import services
from node.sources import FetchedManifest, Origin
from node.transport import Urllib3Transport, read1
from node.upstream import Observer

internal = Blueprint("internal", __name__)

SECRET_HEADER = "X-Shoal-Secret"
MEDIA_TYPE_HEADER = "X-Shoal-Media-Type"
# Set on answers that follow a fill still in progress on the peer.
IN_PROGRESS_HEADER = "X-Shoal-In-Progress"
# Connections a worker keeps to each peer: one per fill it runs, at most.
PEER_CONNECTIONS = 32


class PeerDenied(ShoalError):
    code, status = "DENIED", 403


@internal.route("/internal/v1/content/<reference>", methods=["GET"])
def content(reference: str) -> Response:
    node = services()
    secret = node.cluster_secret
    offered = request.headers.get(SECRET_HEADER, "")
    if not secret or not hmac.compare_digest(offered.encode(), secret.encode()):
        raise PeerDenied("this endpoint is for the nodes of the cluster")
    digest = parse_digest(reference)
    local, fills = node.local, node.fills
    stored = local.open(digest)
    if stored is not None:
        local.touch(digest)
        headers = {"Content-Length": str(stored.size), MEDIA_TYPE_HEADER: local.media_type(digest)}
        return Response(file_body(stored.detach()), headers=headers, direct_passthrough=True)
    following = fills.in_progress(digest)
    if following is None:
        raise BlobUnknown("this node does not hold the content", {"digest": str(digest)})
    headers = {IN_PROGRESS_HEADER: "1"}
    if following.size is not None:
        headers["Content-Length"] = str(following.size)
    body = fills.follow(following, 0, following.size)
    if following.size is None:
        return Response(body, headers=headers, direct_passthrough=True)
    return Response(growing_body(body), headers=headers, direct_passthrough=True)


class PeerStream:
    """A peer's answer, as a ``BlobStream``."""

    origin = Origin.PEER

    def __init__(self, response: httpx.Response, kind: str, observer: Observer) -> None:
        self._response = response
        self._kind = kind
        self._observer = observer
        length = response.headers.get("Content-Length")
        self.size = int(length) if length is not None and length.isdigit() else None
        self.media_type = response.headers.get(MEDIA_TYPE_HEADER, "application/octet-stream")
        self.joined = response.headers.get(IN_PROGRESS_HEADER) == "1"

    def read(self, size: int) -> bytes:
        try:
            data = read1(self._response, size)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"the peer broke off the transfer ({type(exc).__name__})") from None
        self._observer.count(self._kind, "peer_bytes", len(data))
        return data


class PeerClient:
    """Streams content from other nodes; one per worker, shared by its threads."""

    def __init__(self, secret: str, timeout: float, observer: Observer, connections: int = PEER_CONNECTIONS) -> None:
        self._observer = observer
        self._client = httpx.Client(
            # Read in large pieces, like blobs from the upstream; a peer
            # answers with sendfile, so the copy is the whole cost.
            transport=Urllib3Transport(connections),
            headers={SECRET_HEADER: secret, "Accept-Encoding": "identity"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        )
        self._closed = False

    @contextlib.contextmanager
    def open(self, peer_url: str, digest: str, kind: str = "blob") -> Iterator[PeerStream]:
        """Stream ``digest`` from the node at ``peer_url``.

        Raises ``BlobUnknown`` when the peer does not hold it (any longer)
        and ``UpstreamUnavailable`` when it cannot be reached.
        """
        request = self._client.build_request("GET", f"{peer_url.rstrip('/')}/internal/v1/content/{digest}")
        try:
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"cannot reach peer {peer_url} ({type(exc).__name__})") from None
        try:
            if response.status_code == 404:
                raise BlobUnknown(f"peer {peer_url} does not hold {digest}")
            if response.status_code != 200:
                raise UpstreamUnavailable(f"peer {peer_url} answered {response.status_code}")
            yield PeerStream(response, kind, self._observer)
        finally:
            response.close()

    def fetch(self, peer_url: str, digest: str, limit: int) -> FetchedManifest:
        """The whole content (a manifest) from a peer, at most ``limit`` bytes; errors as ``open``."""
        with self.open(peer_url, digest, "manifest") as stream:
            data = bytearray()
            while chunk := stream.read(limit + 1 - len(data)):
                data += chunk
                if len(data) > limit:
                    raise UpstreamUnavailable(f"peer {peer_url} sent more than {limit} bytes")
            return FetchedManifest(bytes(data), stream.media_type, Origin.PEER)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
