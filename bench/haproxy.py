"""The load balancer in front of the clustered systems: HAProxy, round robin.

The benchmark writes its own small configuration (not the deployment's):
one frontend per system on a free port, each balancing every request in
turn over its servers, with timeouts long enough for any blob download.
"""

from __future__ import annotations

from pathlib import Path

from testbed.processes import Process, free_port, require_binary, wait_for_port

_GLOBAL = """\
global
    maxconn 4000

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout http-request 1m
    timeout http-keep-alive 1m
"""


def config(frontends: dict[str, tuple[int, list[str]]]) -> str:
    """HAProxy configuration: frontend name -> (port, server URLs)."""
    sections = [_GLOBAL]
    for name, (port, urls) in frontends.items():
        servers = "\n".join(f"    server {name}-{index + 1} {url.split('://', 1)[1]}" for index, url in enumerate(urls))
        sections.append(
            f"frontend {name}\n    bind 127.0.0.1:{port}\n    default_backend {name}\n\n"
            f"backend {name}\n    balance roundrobin\n{servers}\n"
        )
    return "\n".join(sections)


class HAProxy:
    """One haproxy process in the foreground; ``url(name)`` is a frontend's address."""

    def __init__(self, workdir: Path, backends: dict[str, list[str]]) -> None:
        binary = require_binary("haproxy", "haproxy")
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in backends}
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config({name: (self.ports[name], urls) for name, urls in backends.items()}))
        # -db: stay in the foreground, so the process is ours to stop.
        self.process = Process([binary, "-db", "-f", self.config_path], workdir / "haproxy.log")
        try:
            for port in self.ports.values():
                wait_for_port(port, self.process, "haproxy")
        except BaseException:
            self.process.stop()
            raise

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def close(self) -> None:
        self.process.stop()
