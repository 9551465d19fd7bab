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


# The test files that take longest, longest first. Under .ci/run's two
# workers each worker takes whole files in collection order; starting with
# these keeps either worker from being left with a long file at the end.
SLOWEST_FIRST = (
    "tests/bench/test_quick.py",
    "tests/node/test_cluster.py",
    "tests/shoal/test_up.py",
    "tests/node/test_serving.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for path in SLOWEST_FIRST:
        if not (config.rootpath / path).is_file():
            raise pytest.UsageError(f"tests/conftest.py: SLOWEST_FIRST names {path}, which does not exist")
    rank = {path: index for index, path in enumerate(SLOWEST_FIRST)}
    # A stable sort: the other files, and the tests within every file, keep their order.
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))
