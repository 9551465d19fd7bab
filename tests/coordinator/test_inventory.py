"""An inventory announced in batches (coordinator/inventory.py) against a real Redis."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.fetches import Fetches
from coordinator.inventory import BatchAnswer, BatchedInventory
from coordinator.keys import Keys
from coordinator.locations import ContentInfo
from testbed.clock import FakeClock
from tests.coordinator.digests import digest
from tests.coordinator.test_locations import Directory


@pytest.fixture
def directory(redis_client: redis.Redis, keys: Keys, clock: FakeClock) -> Directory:
    return Directory(redis_client, keys, clock)


@pytest.fixture
def inventory(redis_client: redis.Redis, keys: Keys, directory: Directory) -> BatchedInventory:
    return BatchedInventory(redis_client, keys, directory.locations, directory.membership)


def end(inventory: BatchedInventory, node_id: str, batch_id: str, content: list[ContentInfo]) -> list[str]:
    """The last batch, and the calls that finish the end (as the node's client makes them)."""
    answer = inventory.announce(node_id, batch_id, content, None, last=True)
    evict = list(answer.evict)
    while answer.more:
        answer = inventory.announce(node_id, batch_id, [], None, last=True)
        evict += answer.evict
    return evict


def items(*names: str) -> list[ContentInfo]:
    return [ContentInfo(digest(name), 1) for name in names]


def test_batches_register_at_once_and_the_last_replaces_what_no_batch_named(
    directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("kept", "gone"))

    assert inventory.announce("node-a", "batch-0001", items("kept", "new-1"), None, last=False) == BatchAnswer([])
    # Between batches the old entries stand: a reader sees old and new.
    assert directory.locations.held("node-a") == {digest("kept"), digest("gone"), digest("new-1")}
    assert end(inventory, "node-a", "batch-0001", items("new-2")) == []

    assert directory.locations.held("node-a") == {digest("kept"), digest("new-1"), digest("new-2")}
    assert directory.locations.locate(digest("gone")).holders == []
    assert directory.locations.content(digest("gone")) is None


def test_content_registered_while_the_batches_come_is_kept(directory: Directory, inventory: BatchedInventory) -> None:
    directory.locations.announce("node-a", items("old"))
    inventory.announce("node-a", "batch-0002", items("listed"), None, last=False)
    # Another worker of the node completes a fetch; the listing was made before it.
    directory.locations.add("node-a", items("fetched-meanwhile"))
    end(inventory, "node-a", "batch-0002", [])

    assert directory.locations.held("node-a") == {digest("listed"), digest("fetched-meanwhile")}


def test_a_fetch_completed_while_the_batches_come_is_kept(
    redis_client: redis.Redis, keys: Keys, clock: FakeClock, directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("old"))
    inventory.announce("node-a", "batch-0008", items("listed"), None, last=False)
    lease = directory.leases.acquire("blob:" + digest("fetched"), "node-a", 10_000)
    Fetches(redis_client, keys, clock).complete(
        "blob:" + digest("fetched"), lease.token, "node-a", ContentInfo(digest("fetched"), 5), 3_600_000
    )
    end(inventory, "node-a", "batch-0008", [])

    assert directory.locations.held("node-a") == {digest("listed"), digest("fetched")}


def test_an_empty_inventory_in_one_last_batch_removes_everything(
    directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("a", "b"))
    end(inventory, "node-a", "batch-0003", [])
    assert directory.locations.held("node-a") == set()


def test_a_retried_last_batch_changes_nothing(directory: Directory, inventory: BatchedInventory) -> None:
    inventory.announce("node-a", "batch-0004", items("one"), None, last=False)
    end(inventory, "node-a", "batch-0004", items("two"))
    # The answer was lost and the call retried (on another coordinator): not a new announcement of "two" alone.
    assert inventory.announce("node-a", "batch-0004", items("two"), None, last=True) == BatchAnswer([])
    assert directory.locations.held("node-a") == {digest("one"), digest("two")}


def test_pending_evictions_are_answered_by_their_batch_and_done_with_at_the_end(
    redis_client: redis.Redis, keys: Keys, directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("evicted", "other"))
    redis_client.rpush(keys.evict("node-a"), digest("evicted"), digest("other"))

    assert inventory.announce("node-a", "batch-0005", items("evicted"), None, last=False).evict == [digest("evicted")]
    assert end(inventory, "node-a", "batch-0005", []) == []
    assert directory.locations.held("node-a") == set()
    assert redis_client.llen(keys.evict("node-a")) == 0


def test_a_malformed_batch_id_is_rejected(inventory: BatchedInventory) -> None:
    with pytest.raises(InvalidArgument, match="batch_id"):
        inventory.announce("node-a", "no spaces", items("a"), None, last=True)


def test_every_batch_keeps_the_node_a_member(
    redis_client: redis.Redis, keys: Keys, directory: Directory, inventory: BatchedInventory
) -> None:
    # The node's heartbeats wait while it announces: its membership is about to run out.
    redis_client.pexpire(keys.node("node-a"), 50)
    inventory.announce("node-a", "batch-0006", items("one"), None, last=False)
    assert redis_client.pttl(keys.node("node-a")) > 1000
    # An expired membership is not brought back: the node registers again, as after a missed heartbeat.
    redis_client.delete(keys.node("node-a"))
    end(inventory, "node-a", "batch-0006", items("two"))
    assert not redis_client.exists(keys.node("node-a"))


def test_a_large_end_is_done_a_bounded_piece_per_call_and_carries_on_from_its_cursor(
    redis_client: redis.Redis, keys: Keys, directory: Directory
) -> None:
    # No time per call: each call of the end looks at one SSCAN step of the node's entries.
    inventory = BatchedInventory(redis_client, keys, directory.locations, directory.membership, sweep_budget=0.0)
    old = [ContentInfo(digest(f"old-{i}"), 1) for i in range(3000)]
    kept = old[::3]
    directory.locations.announce("node-a", old)

    inventory.announce("node-a", "batch-0007", kept[:500], None, last=False)
    # Fetched by another worker of the node during the announcement: kept.
    directory.locations.add("node-a", items("fetched-meanwhile"))
    answers = [inventory.announce("node-a", "batch-0007", kept[500:], None, last=True)]
    while answers[-1].more:
        answers.append(inventory.announce("node-a", "batch-0007", [], None, last=True))

    assert len(answers) > 2
    assert directory.locations.held("node-a") == {item.digest for item in kept} | {digest("fetched-meanwhile")}
    assert not list(redis_client.scan_iter(match=f"{keys.prefix}announcing*"))
