"""``shoal up`` as a user runs it: a whole cluster in the foreground, supervised, stopped with Ctrl-C.

The command runs in a subprocess with its output piped, exactly as from a
terminal; the tests read the node URLs it prints, pull through the nodes
(skopeo, or GETs of the manifest and every blob), kill its children with
SIGKILL as a crash would, press Ctrl-C (SIGINT) and then check that nothing
it started is left: no process, no listening port.
"""

from __future__ import annotations

import itertools
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from coordinator.keys import Keys
from testbed.images import Image, build_image, push
from testbed.proc import Proc, listening_ports
from testbed.processes import wait_until
from testbed.pulls import Puller, coordinated_miss, pull, serves
from testbed.registry import DistributionRegistry
from testbed.shoal_up import ShoalUp, State, Tree, consecutive_free_ports, port_is_free
from testbed.skopeo import skopeo_copy

pytestmark = pytest.mark.integration

NODES = 2
WORKERS = 2
# A child killed for the first time is started again after 1 s; these leave
# room for a loaded machine. How long it takes here is in docs/deployment.md.
BACK_WITHIN = 10.0
SERVING_WITHIN = 60.0


def _assert_pulled(directory: Path, image: Image) -> None:
    """skopeo's dir: layout holds manifest.json and each blob under the hex part of its digest."""
    assert (directory / "manifest.json").read_bytes() == image.manifest
    for digest, data in image.blobs.items():
        assert (directory / digest.split(":", 1)[1]).read_bytes() == data, digest


def test_up_serves_on_every_node_and_ctrl_c_stops_everything(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    repository = f"up/{uuid.uuid4().hex[:12]}"
    image = build_image([400_000, 60_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    base = consecutive_free_ports(NODES)
    state = tmp_path / "state"
    args = ["--nodes", str(NODES), "--upstream", upstream_registry.url, "--port", str(base), "--state-dir", str(state)]

    with ShoalUp(args, tmp_path / "shoal-up.stderr") as up:
        urls = up.wait_ready()
        node_ports = [base + index for index in range(NODES)]
        assert urls == [f"http://127.0.0.1:{port}" for port in node_ports]
        tree = up.wait_for_tree(NODES, workers_per_node=2)
        written = State.read(state)
        (coordinator_port,) = written.coordinator_ports
        redis_port = written.redis_port
        # Every address any of the processes listens on: the named ones among
        # them, and nothing beyond the loopback interface --host defaults to.
        listening = listening_ports([proc.pid for proc in tree.everything])
        assert {("127.0.0.1", port) for port in (*node_ports, coordinator_port, redis_port)} <= listening
        assert listening_ports([tree.redis.pid]) == {("127.0.0.1", redis_port)}
        assert {host for host, _ in listening} == {"127.0.0.1"}, listening
        ports = {port for _, port in listening}
        # The check after the stop can see a taken port: every one is taken now.
        assert [port for port in ports if port_is_free(port)] == []

        for index, port in enumerate(node_ports):
            pulled = skopeo_copy(f"127.0.0.1:{port}/{repository}:v1", tmp_path / f"pull-{index + 1}")
            _assert_pulled(pulled, image)

        up.interrupt()
        assert up.wait(timeout=60) == 0, up.describe()
        assert up.lines[-1] == "Shoal stopped.", up.describe()

        # Checked before leaving the block, whose cleanup would kill leftovers,
        # and at once: shoal up waits for its children, and a node's master
        # for its workers, so nothing may still be on its way out.
        assert [proc for proc in tree.everything if proc.running()] == []
        assert sorted(port for port in ports if not port_is_free(port)) == []

    # The second node got every blob from the first, not from the upstream.
    paths = [f"/v2/{repository}/blobs/{digest}" for digest in image.blobs]
    wait_until(
        lambda: all(upstream_registry.count("GET", path) for path in paths), message="the upstream logged no GETs"
    )
    assert {path: upstream_registry.count("GET", path) for path in paths} == dict.fromkeys(paths, 1)


def _args(base: int, nodes: int, upstream: DistributionRegistry, state: Path, *extra: str) -> list[str]:
    return ["--nodes", str(nodes), "--upstream", upstream.url, "--port", str(base), "--state-dir", str(state), *extra]


def _reported(up: ShoalUp, child: str, state: State, delay: int) -> bool:
    """Whether shoal up said on stderr that ``child`` was killed by SIGKILL and comes back in ``delay`` s."""
    line = f"shoal up: {child} was killed by SIGKILL (log: {state.log(child)}); restarting it in {delay}s"
    return line in up.stderr().splitlines()


def _stop_and_check_nothing_is_left(up: ShoalUp, tree: Tree, ports: set[int]) -> None:
    """Ctrl-C, then: exit 0, every process ever seen gone, every port free (checked at once, not awaited)."""
    up.interrupt()
    assert up.wait(timeout=60) == 0, up.describe()
    assert up.lines[-1] == "Shoal stopped.", up.describe()
    assert [proc for proc in (*up.seen, *tree.everything) if proc.running()] == []
    assert sorted(port for port in ports if not port_is_free(port)) == []


def _knows_everything(state: State, nodes: list[str], digests: list[str]) -> bool:
    """Whether Redis lists every node as a member and as a holder of every digest."""
    keys, client = Keys(), state.redis()
    try:
        if client.smembers(keys.nodes()) != set(nodes):
            return False
        return all(client.smembers(keys.loc(digest)) == set(nodes) for digest in digests)
    except redis.RedisError:  # It may still be starting.
        return False


def test_killed_node_coordinator_and_redis_come_back_while_the_others_serve(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    nodes = 3
    repository = f"up/{uuid.uuid4().hex[:12]}"
    image = build_image([300_000, 50_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    base = consecutive_free_ports(nodes)
    state_dir = tmp_path / "state"
    node_ids = [f"node-{index + 1}" for index in range(nodes)]
    misses = (f"miss-{index}" for index in itertools.count())

    with ShoalUp(_args(base, nodes, upstream_registry, state_dir), tmp_path / "shoal-up.stderr") as up:
        urls = up.wait_ready()
        assert (
            "  supervised: redis, coordinator-1, node-1..3: restarted when they exit, after 1s doubling to 30s "
            "(back to 1s after 60s up)" in up.lines
        ), up.lines
        tree = up.wait_for_tree(nodes, WORKERS)
        state = State.read(state_dir)
        ports = {*range(base, base + nodes), state.redis_port, *state.coordinator_ports}
        with httpx.Client(timeout=10.0) as client:
            for url in urls:
                pull(client, url, repository, "v1", image)

        # A node's gunicorn master: the others serve on, and it comes back
        # on its port with its cache.
        with Puller(urls[1:], repository, "v1", image) as puller:
            puller.wait_for_pulls(1)
            os.kill(tree.nodes[0].pid, signal.SIGKILL)
            tree = up.wait_for_tree(nodes, WORKERS, replacing=tree.nodes[0], timeout=BACK_WITHIN)
            wait_until(lambda: serves(urls[0], repository, "v1", image), timeout=SERVING_WITHIN, interval=0.1)
            puller.wait_for_pulls(1)
        assert puller.failures == []
        assert _reported(up, "node-1", state, 1), up.stderr()

        # The coordinator: every node serves on, and misses are fetched once
        # for the cluster again when it is back.
        with Puller(urls, repository, "v1", image) as puller:
            puller.wait_for_pulls(1)
            os.kill(tree.coordinator.pid, signal.SIGKILL)
            tree = up.wait_for_tree(nodes, WORKERS, replacing=tree.coordinator, timeout=BACK_WITHIN)
            wait_until(
                lambda: coordinated_miss(upstream_registry, repository, next(misses), (urls[1], urls[2])),
                timeout=SERVING_WITHIN,
                interval=0.1,
            )
            puller.wait_for_pulls(1)
        assert puller.failures == []
        assert _reported(up, "coordinator-1", state, 1), up.stderr()

        # Redis: it comes back empty, and the nodes register and announce
        # what they hold again, so misses are found on peers again.
        with Puller(urls, repository, "v1", image) as puller:
            puller.wait_for_pulls(1)
            os.kill(tree.redis.pid, signal.SIGKILL)
            tree = up.wait_for_tree(nodes, WORKERS, replacing=tree.redis, timeout=BACK_WITHIN)
            wait_until(
                lambda: _knows_everything(state, node_ids, list(image.blobs)),
                timeout=SERVING_WITHIN,
                interval=0.1,
                message=lambda: f"the cluster did not rebuild its directory\n{up.describe()}",
            )
            wait_until(
                lambda: coordinated_miss(upstream_registry, repository, next(misses), (urls[2], urls[0])),
                timeout=SERVING_WITHIN,
                interval=0.1,
            )
            puller.wait_for_pulls(1)
        assert puller.failures == []
        assert _reported(up, "redis", state, 1), up.stderr()

        # Every child restarted on its own port.
        listening = listening_ports([proc.pid for proc in tree.everything])
        assert {("127.0.0.1", port) for port in ports} <= listening
        _stop_and_check_nothing_is_left(up, tree, {port for _, port in listening})

    # Redis kept nothing on disk, not even at its clean shutdown.
    assert list((state_dir / "redis").iterdir()) == []


def test_a_node_that_keeps_crashing_backs_off_and_ctrl_c_in_its_backoff_stops_everything(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    repository = f"up/{uuid.uuid4().hex[:12]}"
    image = build_image([100_000], seed=repository)
    push(upstream_registry.url, repository, "v1", image)
    base = consecutive_free_ports(NODES)
    with ShoalUp(_args(base, NODES, upstream_registry, tmp_path / "state"), tmp_path / "shoal-up.stderr") as up:
        urls = up.wait_ready()
        tree = up.wait_for_tree(NODES, WORKERS)
        state = State.read(tmp_path / "state")
        ports = {port for _, port in listening_ports([proc.pid for proc in tree.everything])}
        with Puller(urls[1:], repository, "v1", image) as puller:
            puller.wait_for_pulls(1)
            # Killed again as soon as it is back: each wait doubles.
            for delay in (1, 2, 4):
                killed: Proc = tree.nodes[0]
                os.kill(killed.pid, signal.SIGKILL)
                wait_until(lambda: _reported(up, "node-1", state, delay), message=up.describe)  # noqa: B023
                tree = up.wait_for_tree(NODES, WORKERS, replacing=killed, timeout=delay + BACK_WITHIN)
            os.kill(tree.nodes[0].pid, signal.SIGKILL)
            wait_until(lambda: _reported(up, "node-1", state, 8), message=up.describe)
            puller.wait_for_pulls(1)
        assert puller.failures == []
        # Stopped while node-1 waits out its 8 s: it never starts again.
        _stop_and_check_nothing_is_left(up, tree, ports)
        assert "restart 4)" not in up.stderr()


def test_with_two_replicas_killing_the_leader_leaves_misses_served(
    tmp_path: Path, upstream_registry: DistributionRegistry
) -> None:
    repository = f"up/{uuid.uuid4().hex[:12]}"
    state_dir = tmp_path / "state"
    base = consecutive_free_ports(NODES)
    args = _args(base, NODES, upstream_registry, state_dir, "--replicas", "2")
    with ShoalUp(args, tmp_path / "shoal-up.stderr") as up:
        urls = up.wait_ready()
        assert any(
            line.startswith("  supervised: redis, coordinator-1, coordinator-2, node-1..2: ") for line in up.lines
        )
        tree = up.wait_for_tree(NODES, WORKERS, coordinators=2)
        state = State.read(state_dir)
        assert len(set(state.coordinator_ports)) == 2
        for index in range(NODES):
            node = yaml.safe_load((state_dir / f"node-{index + 1}" / "node.yml").read_text())
            assert node["cluster"]["coordinators"] == [f"127.0.0.1:{port}" for port in state.coordinator_ports]
        ports = {port for _, port in listening_ports([proc.pid for proc in tree.everything])}
        assert coordinated_miss(upstream_registry, repository, "before", (urls[0], urls[1]))

        leader = wait_until(state.leader, timeout=15, message="no coordinator took the lead")
        index = state.coordinator_of(leader)
        assert index is not None, leader
        victim = tree.coordinators[index - 1]
        os.kill(victim.pid, signal.SIGKILL)
        # At once, well before the supervisor can have it back: the other
        # replica coordinates the miss.
        assert coordinated_miss(upstream_registry, repository, "after", (urls[0], urls[1]))
        # And another takes the lead once the dead one's lease runs out (the
        # restarted replica runs under a new identity, and may be the one).
        wait_until(lambda: state.leader() not in (None, leader), timeout=30, message="the lead never moved")

        # Ctrl-C while the killed replica starts again.
        tree = up.wait_for_tree(NODES, WORKERS, coordinators=2, replacing=victim, timeout=BACK_WITHIN)
        _stop_and_check_nothing_is_left(up, tree, ports)
