"""Fixtures shared by the whole test suite.

Only fixtures that many test modules need belong here; a fixture used by one
module lives in that module. Servers that are slow to start and safe to share
are session-scoped, and each test keeps to its own repository names so that
sharing them never couples tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.registry import DistributionRegistry


@pytest.fixture(scope="session")
def upstream_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    """A real docker-registry on a free port, shared by the session, that Shoal can cache.

    Its directory (config, data, logs) lives under pytest's base temp so that
    the logs are still there to read after a failing run.
    """
    registry = DistributionRegistry(tmp_path_factory.mktemp("upstream-registry"))
    try:
        yield registry
    finally:
        registry.close()
