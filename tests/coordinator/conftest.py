"""Fixtures for the coordinator's tests: a real Redis, unique key prefixes, a fake clock.

One redis-server serves the whole session; every test gets its own key
prefix, so tests never see each other's keys and nothing needs flushing
(the tests that flush or restart Redis use their own server or do not care
about other prefixes).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from coordinator.keys import Keys
from testbed.clock import FakeClock
from testbed.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def keys() -> Keys:
    return Keys(prefix=f"test-{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
