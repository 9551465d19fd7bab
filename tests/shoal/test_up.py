"""``shoal up`` as a user runs it: a whole cluster in the foreground, supervised, stopped with Ctrl-C.

The command runs in a subprocess with its output piped, exactly as from a
terminal; the tests read the node URLs it prints, pull through the nodes
(skopeo, or GETs of the manifest and every blob), kill its children with
SIGKILL as a crash would, press Ctrl-C (SIGINT) and then check that nothing
it started is left: no process, no listening port.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import yaml

import coordinator.config
from coordinator.keys import Keys
from coordinator.redis_client import connect
from testbed.images import Image, build_image, push
from testbed.proc import Proc, listening_ports
from testbed.processes import wait_until
from testbed.pulls import Puller, coordinated_miss, pull, serves
from testbed.registry import DistributionRegistry
from testbed.shoal_up import ShoalUp, State, Tree, consecutive_free_ports, port_is_free
from testbed.skopeo import skopeo_copy
from tests.node.test_auth import htpasswd_file

pytestmark = pytest.mark.integration

NODES = 2
WORKERS = 2
USER = ("alice", "s3cret-pass-for-up")
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
    # With --htpasswd, so that one cluster shows both: clients need a user
    # of the file (the other tests run without it).
    users = htpasswd_file(tmp_path / "users.htpasswd", *USER)
    args = [
        *("--nodes", str(NODES), "--upstream", upstream_registry.url, "--port", str(base)),
        *("--state-dir", str(state), "--htpasswd", str(users)),
    ]

    with ShoalUp(args, tmp_path / "shoal-up.stderr") as up:
        urls = up.wait_ready()
        assert f"  auth:   pulls need a user of {users} (htpasswd)" in up.lines, up.lines
        _assert_only_its_users_pull(urls, repository, image)
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
            pulled = skopeo_copy(
                f"127.0.0.1:{port}/{repository}:v1", tmp_path / f"pull-{index + 1}", creds=":".join(USER)
            )
            _assert_pulled(pulled, image)

        # Redis answers only with the password shoal up generated, which
        # only the coordinators were given.
        _assert_redis_needs_the_password(written)
        password = written.redis_password
        assert not any(password in part for proc in tree.everything for part in proc.command)

        up.interrupt()
        assert up.wait(timeout=60) == 0, up.describe()
        assert up.lines[-1] == "Shoal stopped.", up.describe()
        _assert_nowhere_but_its_files(password, state, up)
        assert USER[1] not in "\n".join(up.lines) + up.stderr()

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


def _assert_only_its_users_pull(urls: list[str], repository: str, image: Image) -> None:
    """Every node asks for credentials on /v2/ and on content, and takes only those of the htpasswd file."""
    manifest = f"/v2/{repository}/manifests/v1"
    with httpx.Client(timeout=10.0) as client:
        for url in urls:
            for path in ("/v2/", manifest):
                for credentials in (None, (USER[0], "wrong"), ("mallory", USER[1])):
                    refused = client.get(url + path, auth=credentials)
                    assert refused.status_code == 401, (url, path, credentials)
                    assert refused.headers["www-authenticate"] == 'Basic realm="shoal"'
                    assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
            assert client.get(url + "/v2/", auth=USER).status_code == 200


def _assert_redis_needs_the_password(state: State) -> None:
    """Redis refuses clients without the password or with another; the coordinator's client gets in with it."""
    assert len(state.redis_password) >= 32
    for password in ("", "not-the-password"):
        with state.redis(password) as client, pytest.raises(redis.AuthenticationError):
            client.ping()
    url = f"redis://127.0.0.1:{state.redis_port}/0"
    without = coordinator.config.config_from_dict({"cluster_secret": "x", "redis_url": url})
    with connect(without) as client, pytest.raises(redis.AuthenticationError):
        client.get(Keys().leader())
    with_it = dataclasses.replace(without, redis_password=state.redis_password)
    with connect(with_it) as client:
        assert client.smembers(Keys().nodes())


def _assert_nowhere_but_its_files(password: str, state: Path, up: ShoalUp) -> None:
    """The password is in the two files that must hold it (mode 0600), and in no output, log or config."""
    kept = {state / "redis-password", state / "redis.conf"}
    for path in kept:
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert password not in "\n".join(up.lines) and password not in up.stderr()
    others = [path for path in state.rglob("*") if path.is_file() and path not in kept]
    assert [path.name for path in others if path.suffix in (".log", ".yml")], others
    assert [path for path in others if password.encode() in path.read_bytes()] == []


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


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # What htpasswd -m writes: MD5, which the nodes skip, as distribution does.
        ("alice:$apr1$Q1Yk5h2T$5sQX6mq2I5nJ3qYH6T7aY/\n", "no user:bcrypt-hash lines; make them with htpasswd -B"),
        (None, "cannot read it (No such file or directory)"),
    ],
    ids=["md5-only", "missing"],
)
def test_an_htpasswd_file_the_nodes_would_not_accept_stops_shoal_up_at_once(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    users = tmp_path / "users.htpasswd"
    if content is not None:
        users.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "up", "--htpasswd", str(users), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (2, f"shoal up: --htpasswd {users}: {problem}\n")
    # Nothing was started, not even the state directory made.
    assert not (tmp_path / "state").exists()
