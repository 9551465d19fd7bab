"""The Redis ACL user that docs/deployment.md tells operators to create is enough for the coordinator.

The rule is read from the document itself (its ``user shoal ...`` line), set
on a real redis-server, and a coordinator logged in as that user serves
every call a node makes, its ``/metrics``, and the leader's sweep and
dead-node cleanup. Redis's ``ACL LOG`` must stay empty: no command or key
the coordinator touched was refused, not even one whose error redis-py
would swallow. And the user can do nothing beyond the cluster's keys.
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from coordinator.keys import Keys
from coordinator.server import CoordinatorServer
from protos.leases import blob_lease
from protos.values import Content, TagPointer
from testbed.clock import FakeClock
from testbed.redis_server import RedisServer
from tests.coordinator.digests import digest
from tests.coordinator.test_servicer import HOUR_MS, LAYER_TYPE, connect, make_config

pytestmark = pytest.mark.integration

DEPLOYMENT = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
ADMIN_PASSWORD = "admin-password-for-the-acl-test"
PASSWORD = "shoal-password-for-the-acl-test"
_USER_LINE = re.compile(r"^user shoal (?P<rules>.+)$", re.MULTILINE)


def documented_rules() -> list[str]:
    """The ACL rules of the ``user shoal`` line in docs/deployment.md, with the test's password."""
    lines = _USER_LINE.findall(DEPLOYMENT.read_text())
    assert len(lines) == 1, "docs/deployment.md should show one 'user shoal ...' line"
    rules = shlex.split(lines[0])
    passwords = [rule for rule in rules if rule.startswith(">")]
    assert len(passwords) == 1, rules
    return [f">{PASSWORD}" if rule.startswith(">") else rule for rule in rules]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-acl"), password=ADMIN_PASSWORD)
    try:
        with server.client() as admin:
            admin.execute_command("ACL", "SETUSER", "shoal", "reset", *documented_rules())
        yield server
    finally:
        server.close()


def test_the_documented_user_can_do_everything_the_coordinator_does(acl_redis: RedisServer, clock: FakeClock) -> None:
    keys = Keys(prefix=f"shoal:{uuid.uuid4().hex[:8]}:")
    config = make_config(
        keys,
        redis_url=acl_redis.url,
        redis_username="shoal",
        redis_password=PASSWORD,
        metrics_bind="127.0.0.1:0",
    )
    layer, kept, dropped, gone = (digest(name) for name in ("layer", "kept", "dropped", "gone"))
    with acl_redis.client() as admin:
        admin.acl_log_reset()
        with (
            CoordinatorServer(config, clock=clock) as server,
            connect(server, "node-a") as a,
            connect(server, "node-b") as b,
            connect(server, "node-c") as c,
        ):
            for node, url in ((a, "http://a:5000"), (b, "http://b:5000"), (c, "http://c:5000")):
                node.register(url)
            assert a.heartbeat("http://a:5000") == (True, [])
            # An announcement replaces what the node held: it comes first.
            assert a.announce_inventory([Content(kept, 1), Content(dropped, 2)]) == []
            assert b.add_content([Content(kept, 1)], ttl_ms=10 * HOUR_MS) == []
            a.drop_content([dropped])
            b.touch([kept])
            assert c.add_content([Content(gone, 3)]) == []

            lease = a.acquire_lease(blob_lease(layer), 30_000)
            assert lease.granted
            assert b.locate(layer, blob_lease(layer)).fetching
            assert a.renew_lease(blob_lease(layer), lease.token, 30_000)
            a.complete_fetch(blob_lease(layer), lease.token, layer, 1234, LAYER_TYPE, HOUR_MS)
            assert [holder.node_id for holder in b.locate(layer).holders] == ["node-a"]
            aborted = b.acquire_lease(blob_lease(kept), 30_000)
            b.abort_fetch(blob_lease(kept), aborted.token)

            tag = "tag:docker.io/library/alpine:3.20"
            tag_lease = a.acquire_lease(tag, 30_000)
            a.put_tag("docker.io", "library/alpine", "3.20", TagPointer(digest("tag"), size=7), tag_lease.token)
            pointer = b.get_tag("docker.io", "library/alpine", "3.20")
            assert pointer is not None and pointer.digest == digest("tag")

            a.report_metrics("worker-1", 1, {"blobs.requests": 2})
            assert a.get_metrics().cluster["blobs.requests"] == 2
            scrape = httpx.get(f"http://{server.metrics_address}/metrics", timeout=5)
            assert scrape.status_code == 200 and "shoal_node_up" in scrape.text

            # node-c dies (its membership is gone, as when it expires) and
            # the layer expires: the leader cleans up and sweeps.
            admin.delete(keys.node("node-c"))
            clock.advance(3600)
            assert server.scheduler.run_once()
            assert layer in a.heartbeat("http://a:5000")[1]
            assert b.locate(gone).holders == []
        assert admin.acl_log() == []

    # The user reaches the cluster's keys and nothing else.
    with redis.Redis(port=acl_redis.port, username="shoal", password=PASSWORD) as user:
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.get("other:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.config_get("requirepass")
