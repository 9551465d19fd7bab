"""An inventory announced in batches (coordinator/inventory.py) against a real Redis."""

from __future__ import annotations

import pytest
import redis

from coordinator.errors import InvalidArgument
from coordinator.inventory import BatchedInventory
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


def items(*names: str) -> list[ContentInfo]:
    return [ContentInfo(digest(name), 1) for name in names]


def test_batches_register_at_once_and_the_last_replaces_what_no_batch_named(
    directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("kept", "gone"))

    assert inventory.announce("node-a", "batch-0001", items("kept", "new-1"), None, last=False) == []
    # Between batches the old entries stand: a reader sees old and new.
    assert directory.locations.held("node-a") == {digest("kept"), digest("gone"), digest("new-1")}
    assert inventory.announce("node-a", "batch-0001", items("new-2"), None, last=True) == []

    assert directory.locations.held("node-a") == {digest("kept"), digest("new-1"), digest("new-2")}
    assert directory.locations.locate(digest("gone")).holders == []
    assert directory.locations.content(digest("gone")) is None


def test_content_registered_while_the_batches_come_is_kept(directory: Directory, inventory: BatchedInventory) -> None:
    directory.locations.announce("node-a", items("old"))
    inventory.announce("node-a", "batch-0002", items("listed"), None, last=False)
    # Another worker of the node completes a fetch; the listing was made before it.
    directory.locations.add("node-a", items("fetched-meanwhile"))
    inventory.announce("node-a", "batch-0002", [], None, last=True)

    assert directory.locations.held("node-a") == {digest("listed"), digest("fetched-meanwhile")}


def test_an_empty_inventory_in_one_last_batch_removes_everything(
    directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("a", "b"))
    inventory.announce("node-a", "batch-0003", [], None, last=True)
    assert directory.locations.held("node-a") == set()


def test_a_retried_last_batch_changes_nothing(directory: Directory, inventory: BatchedInventory) -> None:
    inventory.announce("node-a", "batch-0004", items("one"), None, last=False)
    inventory.announce("node-a", "batch-0004", items("two"), None, last=True)
    # The answer was lost and the call retried (on another coordinator): not a new announcement of "two" alone.
    inventory.announce("node-a", "batch-0004", items("two"), None, last=True)
    assert directory.locations.held("node-a") == {digest("one"), digest("two")}


def test_pending_evictions_are_answered_by_their_batch_and_done_with_at_the_end(
    redis_client: redis.Redis, keys: Keys, directory: Directory, inventory: BatchedInventory
) -> None:
    directory.locations.announce("node-a", items("evicted", "other"))
    redis_client.rpush(keys.evict("node-a"), digest("evicted"), digest("other"))

    assert inventory.announce("node-a", "batch-0005", items("evicted"), None, last=False) == [digest("evicted")]
    assert inventory.announce("node-a", "batch-0005", [], None, last=True) == []
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
    inventory.announce("node-a", "batch-0006", items("two"), None, last=True)
    assert not redis_client.exists(keys.node("node-a"))
