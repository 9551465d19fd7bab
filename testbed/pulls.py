"""Pulls through Shoal nodes as a client makes them, checked byte for byte.

``pull`` fetches an image's manifest by tag and every blob through one node.
``Puller`` does that over and over in a thread, through several nodes, and
keeps every failure, to show that a cluster kept serving while one of its
processes was killed. ``coordinated_miss`` tells whether misses are fetched
once for the whole cluster again, as they are only while the coordinator
answers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

import httpx

from testbed.images import Image, build_image, push
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry


def pull(client: httpx.Client, url: str, repository: str, tag: str, image: Image) -> None:
    """GET the manifest of ``repository:tag`` and each blob through ``url``; raise unless each has the right bytes."""
    response = client.get(f"{url}/v2/{repository}/manifests/{tag}", headers={"Accept": image.media_type})
    if response.status_code != 200 or response.content != image.manifest:
        raise AssertionError(f"{url}: manifest {repository}:{tag} answered {response.status_code}")
    for digest, data in image.blobs.items():
        response = client.get(f"{url}/v2/{repository}/blobs/{digest}")
        if response.status_code != 200 or response.content != data:
            raise AssertionError(f"{url}: blob {digest} answered {response.status_code}, {len(response.content)} bytes")


def serves(url: str, repository: str, tag: str, image: Image) -> bool:
    """Whether a ``pull`` through ``url`` succeeds now."""
    try:
        with httpx.Client(timeout=5.0) as client:
            pull(client, url, repository, tag, image)
    except (httpx.HTTPError, AssertionError):
        return False
    return True


@dataclass
class Failure:
    url: str
    error: str
    at: float


@dataclass
class Puller:
    """Pulls ``repository:tag`` through each of ``urls`` in turn until closed, or ``limit`` seconds at most.

    Used as a context manager: leaving the block stops and joins the thread.
    ``pulls`` counts good pulls per URL; ``failures`` holds every bad one.
    """

    urls: list[str]
    repository: str
    tag: str
    image: Image
    limit: float = 300.0
    pulls: dict[str, int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="puller")

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        with httpx.Client(timeout=10.0) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                for url in self.urls:
                    try:
                        pull(client, url, self.repository, self.tag, self.image)
                    except (httpx.HTTPError, AssertionError) as exc:
                        self.failures.append(Failure(url, repr(exc), time.monotonic()))
                    else:
                        self.pulls[url] = self.pulls.get(url, 0) + 1

    def wait_for_pulls(self, count: int, timeout: float = 30) -> None:
        """Wait until every URL served ``count`` more good pulls than now."""
        target = {url: self.pulls.get(url, 0) + count for url in self.urls}
        wait_until(
            lambda: all(self.pulls.get(url, 0) >= target[url] for url in self.urls),
            timeout=timeout,
            message=lambda: f"pulls stalled at {self.pulls}, failures {self.failures[-3:]}",
        )

    def __enter__(self) -> Puller:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


def coordinated_miss(upstream: DistributionRegistry, repository: str, tag: str, urls: tuple[str, str]) -> bool:
    """Whether a blob nobody has, asked of two nodes at once, was fetched from the upstream exactly once.

    Pushes a fresh image as ``repository:tag`` first (its layer is the
    blob). With a coordinator answering, one node takes the lease and the
    other follows it or reads its copy; without one, each node goes to the
    upstream itself. Either way both must get the right bytes.
    """
    image = build_image([200_000], seed=f"{repository}:{tag}")
    push(upstream.url, repository, tag, image)
    path = f"/v2/{repository}/blobs/{image.layer_digests[0]}"
    answers: dict[str, bytes | str] = {}

    def get(url: str) -> None:
        try:
            answers[url] = httpx.get(f"{url}{path}", timeout=30.0).content
        except httpx.HTTPError as exc:
            answers[url] = repr(exc)

    threads = [threading.Thread(target=get, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wrong = {url: str(answer)[:200] for url, answer in answers.items() if answer != image.layers[0]}
    if wrong:
        raise AssertionError(f"wrong answers to GET {path}: {wrong}")
    # The registry logs a request once its handler returned, a moment after
    # the body: both nodes' GETs, if there were two, are done by then.
    wait_until(lambda: upstream.count("GET", path), timeout=10, message=f"the upstream logged no GET {path}")
    return upstream.count("GET", path) == 1
