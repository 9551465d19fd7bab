"""``shoal up`` as a user runs it: a whole cluster in the foreground, stopped with Ctrl-C.

The command runs in a subprocess with its output piped, exactly as from a
terminal; the test reads the node URLs it prints, pulls through every node
with skopeo, presses Ctrl-C (SIGINT) and then checks that nothing it started
is left: no process, no listening port.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from testbed.images import Image, build_image, push
from testbed.proc import listening_ports
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry
from testbed.shoal_up import ShoalUp, consecutive_free_ports, port_is_free
from testbed.skopeo import skopeo_copy

pytestmark = pytest.mark.integration

NODES = 2


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
        coordinator = yaml.safe_load((state / "coordinator.yml").read_text())["coordinator"]
        coordinator_port = int(coordinator["bind"].rpartition(":")[2])
        redis_port = urlsplit(coordinator["redis_url"]).port
        assert redis_port is not None
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
