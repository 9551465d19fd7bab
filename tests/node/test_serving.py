"""A real node under many, slow, stalled and half-open clients (node/serving.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from testbed.fake_upstream import FakeUpstream
from testbed.images import build_image, random_layer
from testbed.node import NodeProcess
from testbed.processes import wait_until

pytestmark = pytest.mark.integration

# A client's receive buffer: small, so that a client that does not read
# stops the node's sends after a few kilobytes, as a slow link would.
RCVBUF = 16 * 1024


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def _node(tmp_path: Path, upstream: FakeUpstream, server: dict[str, object] | None = None, **sections: object):
    settings: dict[str, object] = {"upstream": {"timeout": "10s", "tag_ttl": "0s"}, **sections}
    settings["server"] = server or {}
    return NodeProcess(tmp_path, upstream.url, settings)  # type: ignore[arg-type]


def _slow_client(port: int, path: str) -> socket.socket:
    """A connection that sends a GET and then reads nothing (until the test says)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    # One request per connection: the node closes it after the body.
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return sock


def _drain(sock: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    return bytes(received)


def test_small_requests_are_answered_while_hundreds_of_slow_clients_download(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    image = build_image([8 * 1024 * 1024], seed="slow")
    upstream.add_image("serving/app", "v1", image)
    layer, layer_digest = image.layers[0], image.layer_digests[0]
    node = _node(tmp_path, upstream)
    try:
        with node.client() as http:
            assert http.get(f"/v2/serving/app/blobs/{layer_digest}").content == layer
            manifest = http.get("/v2/serving/app/manifests/v1")
            assert manifest.status_code == 200
        clients = [_slow_client(node.port, f"/v2/serving/app/blobs/{layer_digest}") for _ in range(300)]
        try:
            # Every one of them is being served at once: each got its headers.
            for sock in clients:
                assert sock.recv(12) == b"HTTP/1.1 200"
            # A thread per download (the old model) answered nothing now.
            with httpx.Client(base_url=node.url, timeout=5) as http:
                assert http.get("/healthz").status_code == 200
                assert http.get("/v2/").status_code == 200
                by_digest = http.get(f"/v2/serving/app/manifests/{manifest.headers['Docker-Content-Digest']}")
                assert by_digest.content == manifest.content
            # And each slow client still gets the whole blob once it reads.
            with ThreadPoolExecutor(32) as pool:
                bodies = list(pool.map(_drain, clients[:32]))
            for body in bodies:
                assert body.endswith(layer)
        finally:
            for sock in clients:
                sock.close()
    finally:
        node.stop()


def test_followers_of_one_cold_fill_all_get_the_right_bytes(tmp_path: Path, upstream: FakeUpstream) -> None:
    data = random_layer(4 * 1024 * 1024, seed="followers")
    digest = upstream.add_blob("serving/app", data)
    gate = threading.Event()
    fault = upstream.set_fault(digest, gate=gate)
    node = _node(tmp_path, upstream)
    started = threading.Barrier(101)

    def pull() -> bytes:
        with (
            httpx.Client(base_url=node.url, timeout=30) as http,
            http.stream("GET", f"/v2/serving/app/blobs/{digest}") as response,
        ):
            assert response.status_code == 200
            started.wait(30)
            return response.read()

    try:
        with ThreadPoolExecutor(100) as pool:
            pulls = [pool.submit(pull) for _ in range(100)]
            # All hundred answered while the upstream holds the body back:
            # they are all following the one fill.
            started.wait(30)
            assert fault.reached.is_set()
            gate.set()
            bodies = [future.result(timeout=60) for future in pulls]
    finally:
        gate.set()
        node.stop()
    assert all(body == data for body in bodies)
    assert upstream.count("GET", f"/v2/serving/app/blobs/{digest}") == 1


def test_a_stalled_client_is_disconnected_after_send_timeout(tmp_path: Path, upstream: FakeUpstream) -> None:
    data = random_layer(16 * 1024 * 1024, seed="stalled")
    digest = upstream.add_blob("serving/app", data)
    node = _node(tmp_path, upstream, {"send_timeout": "1s"})
    try:
        with node.client() as http:
            assert http.get(f"/v2/serving/app/blobs/{digest}").content == data
        sock = _slow_client(node.port, f"/v2/serving/app/blobs/{digest}")
        try:
            assert sock.recv(12) == b"HTTP/1.1 200"
            wait_until(
                lambda: "accepted no bytes" in node.log_text(),
                message="the stalled client was never disconnected",
            )
            received = _drain(sock)
            # Cut short: the node gave up on it, it did not send it all.
            assert len(received) < len(data)
        finally:
            sock.close()
        with node.client() as http:
            assert http.get("/healthz").status_code == 200
    finally:
        node.stop()


def test_an_incomplete_request_is_dropped_after_the_header_timeout(tmp_path: Path, upstream: FakeUpstream) -> None:
    node = _node(tmp_path, upstream, {"header_timeout": "1s"})
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            # No blank line: the head never completes, and the node hangs up.
            assert sock.recv(1024) == b""
        with node.client() as http:
            assert http.get("/v2/").status_code == 200
    finally:
        node.stop()


def test_connections_beyond_the_ceiling_get_503_with_retry_after(tmp_path: Path, upstream: FakeUpstream) -> None:
    node = _node(tmp_path, upstream, {"workers": 1, "max_connections": 4, "header_timeout": "30s"})
    idle: list[socket.socket] = []

    def status() -> httpx.Response:
        with httpx.Client(base_url=node.url, timeout=10) as http:
            return http.get("/v2/")

    try:
        assert status().status_code == 200
        idle = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(4)]
        refused = wait_until(lambda: (answer := status()).status_code == 503 and answer, message="never refused")
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"
        idle.pop().close()
        wait_until(lambda: status().status_code == 200, message="a freed connection was not reused")
    finally:
        for sock in idle:
            sock.close()
        node.stop()


def test_fills_beyond_max_fills_wait_and_tag_checks_do_not(tmp_path: Path, upstream: FakeUpstream) -> None:
    image = build_image([64 * 1024], seed="tag")
    upstream.add_image("serving/app", "v1", image)
    gate = threading.Event()
    blobs = {}
    faults = []
    for number in range(3):
        data = random_layer(256 * 1024, seed=f"fill-{number}")
        digest = upstream.add_blob("serving/app", data)
        blobs[digest] = data
        faults.append(upstream.set_fault(digest, gate=gate))
    node = _node(tmp_path, upstream, {"workers": 1}, cache={"max_fills": 2})

    def pull(digest: str) -> bytes:
        with httpx.Client(base_url=node.url, timeout=30) as http:
            return http.get(f"/v2/serving/app/blobs/{digest}").content

    try:
        with ThreadPoolExecutor(3) as pool:
            pulls = {digest: pool.submit(pull, digest) for digest in blobs}
            wait_until(lambda: sum(fault.reached.is_set() for fault in faults) == 2, message="two fills never ran")
            # Both fill slots are taken and their upstream connections busy;
            # a tag check still goes to the upstream and answers.
            with node.client() as http:
                assert http.get("/v2/serving/app/manifests/v1").status_code == 200
            assert upstream.count("HEAD", "/v2/serving/app/manifests/v1") == 1
            # The third fill waits for a slot instead of failing.
            assert sum(fault.reached.is_set() for fault in faults) == 2
            gate.set()
            for digest, future in pulls.items():
                assert future.result(timeout=30) == blobs[digest]
    finally:
        gate.set()
        node.stop()


def test_a_client_that_always_has_its_next_request_ready_does_not_starve_the_others(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    node = _node(tmp_path, upstream, {"workers": 1})
    pipelined = 1000
    try:
        with (
            socket.create_connection(("127.0.0.1", node.port), timeout=30) as greedy,
            socket.create_connection(("127.0.0.1", node.port), timeout=30) as other,
        ):
            # Warm: the first requests of a worker wait on things of their own.
            for sock in (greedy, other):
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert _read_answers(sock, 1, b"{}\n") == 1
            # Its answers are read as they come, so no send of the node ever waits.
            reader = ThreadPoolExecutor(1)
            answers = reader.submit(_read_answers, greedy, pipelined)
            greedy.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * pipelined)
            other.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert other.recv(12) == b"HTTP/1.1 200"
            assert answers.result(timeout=60) == pipelined
            reader.shutdown()
    finally:
        node.stop()
    # One worker logs its answers in the order it sent them: the other
    # client's came between the greedy one's, not after all of them.
    served = [line for line in node.log_text().splitlines() if '"GET /healthz"' in line or '"GET /v2/"' in line]
    served = served[3:]
    position = next(number for number, line in enumerate(served) if '"GET /v2/"' in line)
    assert position < pipelined // 2, f"answered after {position} requests of the other client"


def _read_answers(sock: socket.socket, expected: int, last_body: bytes = b"") -> int:
    """Read until ``expected`` answers (the last ending in ``last_body``) came in; how many did."""
    received = bytearray()
    while not (received.count(b"HTTP/1.1 200") >= expected and received.endswith(last_body)):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        received += chunk
    return received.count(b"HTTP/1.1 200")
