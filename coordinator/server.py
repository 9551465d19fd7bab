"""The coordinator process: a gRPC server, ``/metrics``, its scheduler thread, and ``main``.

``CoordinatorServer`` builds every collaborator from a ``CoordinatorConfig``
(or takes a ready Redis client, for tests), serves until ``close``, and
runs the scheduler loop and the ``/metrics`` HTTP server beside the gRPC
server. ``main`` is the command line::

    python -m coordinator.server --config shoal.yaml

SIGTERM and SIGINT stop it gracefully: calls in progress get
``shutdown_grace`` seconds, ``/metrics`` stops, the scheduler thread is
joined and resigns its lead, and the process exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType, TracebackType

import grpc
import redis

from coordinator.auth import AuthInterceptor
from coordinator.bindings import Bindings
from coordinator.config import CONFIG_ENV, CoordinatorConfig, describe_keys, load_config, parse_any_bind
from coordinator.election import LeaderElection
from coordinator.errors import ConfigError
from coordinator.fetches import Fetches
from coordinator.inventory import BatchedInventory
from coordinator.keys import Keys
from coordinator.leases import Leases
from coordinator.locations import Locations
from coordinator.membership import Membership
from coordinator.metrics import Metrics
from coordinator.metrics_server import MetricsServer
from coordinator.redis_client import connect
from coordinator.scheduler import Schedule, Scheduler
from coordinator.servicer import CoordinatorServicer, add_to_server
from coordinator.tags import Tags

log = logging.getLogger("coordinator")


class CoordinatorServer:
    """One coordinator replica: the gRPC server, ``/metrics`` and the scheduler loop.

    The constructor binds both ports (``port``, and ``metrics_port`` unless
    ``metrics_bind`` is empty), so an address in use fails at once with
    ``OSError``; ``start`` serves; ``close`` stops everything and is safe to
    call twice. Usable as a context manager.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.time,
        identity: str | None = None,
    ) -> None:
        self.config = config
        self._owns_client = client is None
        self.redis = client if client is not None else connect(config)
        keys = Keys(config.key_prefix)
        membership = Membership(self.redis, keys, config.membership_ttl, clock)
        leases = Leases(self.redis, keys)
        schedule = Schedule(self.redis, keys, clock)
        self.scheduler = Scheduler(
            schedule,
            membership,
            LeaderElection(self.redis, keys, config.leader_lease, identity),
            config.scheduler_interval,
        )
        metrics = Metrics(self.redis, keys, membership)
        locations = Locations(self.redis, keys, membership, leases, config.default_ttl, clock)
        self.servicer = CoordinatorServicer(
            membership=membership,
            locations=locations,
            inventory=BatchedInventory(self.redis, keys, locations, membership),
            leases=leases,
            fetches=Fetches(self.redis, keys, clock),
            schedule=schedule,
            tags=Tags(self.redis, keys, retention=config.default_ttl),
            bindings=Bindings(self.redis, keys),
            metrics=metrics,
            max_evictions=config.max_evictions,
        )
        # Bound before the gRPC port: a gRPC server that never started keeps
        # its port until the process exits, even after stop().
        self.metrics_server = MetricsServer(metrics, config.metrics_bind) if config.metrics_bind else None
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="shoal-rpc"),
            interceptors=[AuthInterceptor(config.cluster_secret)],
            # gRPC sets SO_REUSEPORT by default, which would let a second
            # coordinator bind the same port silently and split the calls.
            options=[("grpc.so_reuseport", 0)],
        )
        add_to_server(self.servicer, self._server)
        try:
            self.port = self._bind(config)
        except OSError:
            if self.metrics_server is not None:
                self.metrics_server.close()
            raise
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    @property
    def address(self) -> str:
        """HOST:PORT clients reach this server at (the bound port, even when 0 was asked for)."""
        return _reachable(self.config.bind, self.port)

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (the bound one, even when 0 was asked for); None when disabled."""
        return self.metrics_server.port if self.metrics_server is not None else None

    @property
    def metrics_address(self) -> str | None:
        """HOST:PORT Prometheus reaches ``/metrics`` at; None when disabled."""
        if self.metrics_server is None:
            return None
        return _reachable(self.config.metrics_bind, self.metrics_server.port)

    def start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            self._server.start()
            self.scheduler.start()
            if self.metrics_server is not None:
                self.metrics_server.start()

    def close(self, grace: float | None = None) -> None:
        """Stop serving (calls in progress get ``grace`` seconds), ``/metrics`` and the scheduler."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        grace = self.config.shutdown_grace if grace is None else grace
        self._server.stop(grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.scheduler.close()
        if self._owns_client:
            self.redis.close()

    def __enter__(self) -> CoordinatorServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _bind(self, config: CoordinatorConfig) -> int:
        try:
            if config.tls_cert and config.tls_key:
                with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                port = self._server.add_secure_port(config.bind, credentials)
            else:
                port = self._server.add_insecure_port(config.bind)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen on {config.bind}: is the address in use or not local?")
        return int(port)


def _reachable(bind: str, port: int) -> str:
    """HOST:PORT for ``bind`` with its bound ``port``; a wildcard host becomes the loopback address."""
    host = bind.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator.server",
        description=textwrap.fill(
            "Run a Shoal coordinator: the gRPC service nodes ask where content is, "
            "who fetches it, and what to evict, and /metrics with the cluster's counters "
            "for Prometheus. All state is in Redis, so any number "
            "of replicas can run against one Redis; one of them (the elected leader) "
            "runs the TTL scheduler. SIGTERM or SIGINT stops it gracefully."
        ),
        epilog=textwrap.fill(
            "Configuration keys: the coordinator: section of the YAML file; the "
            "environment variable in brackets overrides each key."
        )
        + "\n"
        + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML file whose coordinator: section configures this process (default: ${CONFIG_ENV}, if set); "
        "other sections are ignored",
    )
    parser.add_argument(
        "--bind",
        metavar="HOST:PORT",
        help="listen here instead of coordinator.bind (default 0.0.0.0:7000)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log to stderr (default INFO)",
    )
    return parser


def _bind_option(value: str) -> str:
    try:
        return parse_any_bind(value)
    except ValueError as exc:
        raise ConfigError(f"--bind: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        if args.bind:
            config = dataclasses.replace(config, bind=_bind_option(args.bind))
    except ConfigError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server = CoordinatorServer(config)
    except OSError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 1
    with server:
        log.info(
            "serving on %s (%s), Redis %s, key prefix %r, replica %s",
            config.bind.rpartition(":")[0] + f":{server.port}",
            "TLS" if config.tls_cert else "plaintext",
            config.describe_redis(),
            config.key_prefix,
            server.scheduler.election.identity,
        )
        if server.metrics_server is not None:
            log.info(
                "serving /metrics on %s",
                config.metrics_bind.rpartition(":")[0] + f":{server.metrics_server.port}",
            )
        stop.wait()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
