"""Fixtures of the upstream client's tests and of the fill tests (a store and its fills)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from node.config import UpstreamConfig
from node.storage.fill import Fills
from node.storage.local import LocalStore
from node.upstream import Upstream
from testbed.clock import FakeClock
from tests.node.fake_registry import REGISTRY, Handler


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def connect(clock: FakeClock) -> Iterator[Callable[..., Upstream]]:
    """Build Upstreams on a fake transport; all are closed after the test."""
    made: list[Upstream] = []

    def connect(handler: Handler, **config: object) -> Upstream:
        upstream = Upstream(
            UpstreamConfig(url=REGISTRY, **config),  # type: ignore[arg-type]
            transport=httpx.MockTransport(handler),
            clock=clock,
            monotonic=clock,
        )
        made.append(upstream)
        return upstream

    yield connect
    for upstream in made:
        upstream.close()


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(str(tmp_path), 1 << 30)


@pytest.fixture
def fills(store: LocalStore) -> Iterator[Fills]:
    fills = Fills(store, timeout=5)
    yield fills
    fills.close()
