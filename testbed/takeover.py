"""The fetching node killed mid-fetch: how long until another node's client has the blob, and what it cost.

One scenario, asserted by ``tests/node/test_cluster.py`` and measured by
``python -m bench.takeover``: a two-node cluster in front of a fake
upstream that paces the blob at ``rate`` bytes a second. node-1 fetches it
for a client; once the upstream has sent ``kill_at`` bytes, node-1 is
killed with SIGKILL. node-2's client either was following node-1's fetch
already (``follow``: node-2 streams from node-1's peer endpoint into its
own fill) or asks just after the kill. The figures are the time from the
kill to node-2's complete response (and to its request to the upstream,
the takeover) and the body bytes the upstream sent in all, and the run
checks what must hold whatever the timing: the right
bytes, nothing corrupt in either node's store, node-2 registered as the
blob's holder.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from testbed.cluster import Cluster, verify_store
from testbed.fake_upstream import FakeUpstream
from testbed.images import random_layer
from testbed.processes import wait_until

NAME = "takeover/layer"
# The upstream writes the paced blob in pieces of this size.
PIECE = 64 * 1024


@dataclass(frozen=True)
class Takeover:
    """What one run measured."""

    size: int
    rate: float
    # From the kill to the end of node-2's response, in seconds.
    seconds: float
    # From the kill to node-2's GET of the blob from the upstream (the takeover), in seconds.
    taken_over: float
    # Body bytes the upstream sent for the blob, to both nodes, in all.
    upstream_bytes: int
    # Whether node-2 asked the upstream with a Range request (honoured or not).
    ranged: bool
    # The first byte that Range asked for (what node-2 had already): 0 without one.
    resumed_at: int = 0

    @property
    def transfer(self) -> float:
        """Seconds the whole blob takes at the upstream's pace."""
        return self.size / self.rate

    @property
    def blobs(self) -> float:
        """The upstream's bytes as a multiple of the blob."""
        return self.upstream_bytes / self.size


def kill_the_fetcher(
    workdir: Path,
    *,
    size: int,
    rate: float,
    kill_at: int,
    follow: bool = True,
    honour_range: bool = True,
    product_defaults: bool = False,
    node_settings: dict[str, Any] | None = None,
) -> Takeover:
    """Run the scenario once in ``workdir``; raise ``AssertionError`` when something wrong was served or stored."""
    data = random_layer(size, seed=f"takeover-{size}-{follow}-{honour_range}")
    with FakeUpstream() as upstream:
        upstream.honour_range = honour_range
        digest = upstream.add_blob(NAME, data)
        upstream.set_fault(digest, rate=rate, chunk_size=PIECE)
        path = f"/v2/{NAME}/blobs/{digest}"
        with Cluster(
            workdir, upstream.url, nodes=2, product_defaults=product_defaults, node_settings=node_settings
        ) as cluster:
            first, second = cluster.nodes
            with httpx.Client(timeout=120) as http, contextlib.ExitStack() as responses:
                leading = responses.enter_context(http.stream("GET", first.url + path))
                assert leading.status_code == 200, leading.read()
                wait_until(lambda: upstream.bytes_sent(path) > 0, timeout=30, message="node-1 never fetched")
                if follow:
                    head, rest = _ask(responses, http, second.url + path)
                wait_until(
                    lambda: upstream.bytes_sent(path) >= kill_at,
                    timeout=60,
                    interval=0.005,
                    message=lambda: f"the upstream sent only {upstream.bytes_sent(path)} bytes",
                )
                first.kill()
                killed = time.monotonic()
                if not follow:
                    head, rest = _ask(responses, http, second.url + path)
                body = head + b"".join(rest)
                seconds = time.monotonic() - killed
            assert body == data, f"node-2 answered {len(body)} bytes that are not the blob"
            verify_store(first)
            verify_store(second)
            wait_until(lambda: digest in second.stored_digests(), message="node-2 did not store the blob")
            wait_until(lambda: cluster.holders(digest) == {"node-2"}, message="node-2 is not the blob's holder")
            gets = upstream.blob_gets(path)
            assert len(gets) == 2, f"the upstream was asked {len(gets)} times for the blob"
            return Takeover(
                size=size,
                rate=rate,
                seconds=seconds,
                taken_over=gets[1].at - killed,
                upstream_bytes=upstream.bytes_sent(path),
                ranged=gets[1].range is not None,
                resumed_at=_first_byte(gets[1].range),
            )


def _first_byte(asked: str | None) -> int:
    """The start of a ``bytes=<first>-`` Range header; 0 without one."""
    if asked is None:
        return 0
    return int(asked.removeprefix("bytes=").split("-", 1)[0])


def _ask(responses: contextlib.ExitStack, http: httpx.Client, url: str) -> tuple[bytes, Iterator[bytes]]:
    """Start a GET of the blob; its first piece (so the node is streaming it now) and the rest, to read."""
    response = responses.enter_context(http.stream("GET", url))
    assert response.status_code == 200, response.read()
    pieces = response.iter_raw()
    return next(pieces, b""), pieces
