"""A registry client that pulls as docker or containerd do, and measures it.

A pull asks for the manifest by tag, then downloads the config and every
layer, a few at a time (docker's ``max-concurrent-downloads`` is 3), each
client on its own connections as separate machines would be. Bodies are
counted, and with ``verify`` hashed, never kept.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx

from bench.publisher import Published
from node.media_types import ACCEPT_MANIFESTS

T = TypeVar("T")


# docker retries a failed layer download (five times by default); so does
# this client, and counts it: a system that needs retries is slower for it.
RETRIES = 3


class PullFailed(RuntimeError):
    """A pull did not get what the image holds; the benchmark stops."""


class _Broken(PullFailed):
    """A failure a client retries: a server error, a broken connection, a short body."""


class Failures:
    """Requests that failed and were retried, counted across a pull's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.last = ""

    def add(self, text: str) -> None:
        with self._lock:
            self.count += 1
            self.last = text


def http_client(connections: int) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(300.0, connect=10.0),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        # Nothing on the path compresses; say so, as registry clients do.
        headers={"Accept-Encoding": "identity"},
    )


def _retrying(failures: Failures | None, attempt: Callable[[], T]) -> T:
    for number in range(RETRIES + 1):
        try:
            return attempt()
        except (_Broken, httpx.TransportError) as exc:
            if failures is None or number == RETRIES:
                raise PullFailed(str(exc)) from exc
            failures.add(str(exc))
            time.sleep(0.1 * (number + 1))
    raise AssertionError("not reached")


def fetch_blob(
    client: httpx.Client, url: str, size: int, digest: str | None = None, failures: Failures | None = None
) -> int:
    """Download one blob; check its size, and its digest when given.

    With ``failures`` a broken download is retried and counted there; a
    body that does not match its digest never is.
    """
    return _retrying(failures, lambda: _fetch_once(client, url, size, digest))


def _fetch_once(client: httpx.Client, url: str, size: int, digest: str | None) -> int:
    hasher = hashlib.sha256() if digest is not None else None
    received = 0
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            response.read()
            failure = _Broken if response.status_code >= 500 else PullFailed
            raise failure(f"GET {url} answered {response.status_code}: {response.text[:200]}")
        for chunk in response.iter_raw():
            received += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    if received != size:
        raise _Broken(f"GET {url} sent {received} bytes, expected {size}")
    if hasher is not None and f"sha256:{hasher.hexdigest()}" != digest:
        raise PullFailed(f"GET {url} sent content that does not match {digest}")
    return received


def pull(
    base_url: str, image: Published, *, parallel: int = 3, verify: bool = False, failures: Failures | None = None
) -> float:
    """Pull ``image`` through ``base_url`` on fresh connections; return the seconds it took."""
    with http_client(parallel) as client:
        started = time.perf_counter()
        _pull(client, base_url, image, parallel, verify, failures or Failures())
        return time.perf_counter() - started


def _manifest(client: httpx.Client, base_url: str, image: Published) -> bytes:
    url = f"{base_url}/v2/{image.repository}/manifests/{image.tag}"
    response = client.get(url, headers={"Accept": ACCEPT_MANIFESTS})
    if response.status_code != 200:
        failure = _Broken if response.status_code >= 500 else PullFailed
        raise failure(f"manifest {image.repository}:{image.tag} answered {response.status_code}: {response.text}")
    return response.content


def _pull(
    client: httpx.Client, base_url: str, image: Published, parallel: int, verify: bool, failures: Failures
) -> None:
    manifest = json.loads(_retrying(failures, lambda: _manifest(client, base_url, image)))
    listed = [manifest["config"]] + manifest["layers"]
    if [(item["digest"], item["size"]) for item in listed] != list(image.blobs):
        raise PullFailed(f"manifest of {image.repository}:{image.tag} lists other blobs than were pushed")

    def one(blob: tuple[str, int]) -> int:
        digest, size = blob
        url = f"{base_url}/v2/{image.repository}/blobs/{digest}"
        return fetch_blob(client, url, size, digest if verify else None, failures)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, image.blobs))


@dataclass(frozen=True)
class Burst:
    wall: float
    # Seconds each client took, from the common start to its last byte.
    clients: list[float]
    # Requests that failed and were retried, over all clients.
    retried: int


def burst(base_url: str, image: Published, clients: int, *, parallel: int = 3, verify: bool = False) -> Burst:
    """``clients`` clients pull ``image`` at the same moment."""
    start = threading.Barrier(clients + 1)
    failures = Failures()
    durations: list[float] = [0.0] * clients
    errors: list[BaseException] = []
    began = [0.0]

    def client(index: int) -> None:
        with http_client(parallel) as http:
            try:
                start.wait()
                _pull(http, base_url, image, parallel, verify, failures)
                durations[index] = time.perf_counter() - began[0]
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    began[0] = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began[0]
    if errors:
        raise PullFailed(f"{len(errors)} of {clients} clients failed; the first: {errors[0]}") from errors[0]
    return Burst(wall, durations, failures.count)


@dataclass(frozen=True)
class Timed:
    """One download: when its first body byte came, and its last."""

    first_byte: float
    total: float
    size: int


class Download:
    """A blob download in a background thread, timed from the moment the request is sent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.first_byte = threading.Event()
        self.result: Timed | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Download:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with http_client(1) as client:
                started = time.perf_counter()
                first = None
                size = 0
                with client.stream("GET", self.url) as response:
                    if response.status_code != 200:
                        raise PullFailed(f"GET {self.url} answered {response.status_code}")
                    for chunk in response.iter_raw():
                        if first is None and chunk:
                            first = time.perf_counter() - started
                            self.first_byte.set()
                        size += len(chunk)
                self.result = Timed(first if first is not None else 0.0, time.perf_counter() - started, size)
        except BaseException as exc:
            self.error = exc
        finally:
            self.first_byte.set()

    def wait(self, timeout: float = 300.0) -> Timed:
        self._thread.join(timeout)
        if self.error is not None:
            raise PullFailed(f"GET {self.url} failed: {self.error}") from self.error
        if self.result is None:
            raise PullFailed(f"GET {self.url} did not finish within {timeout:.0f}s")
        return self.result
