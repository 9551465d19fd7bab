"""The upstream registry, with its Prometheus gauge of requests in flight.

The access log has a line for a request only once it is over. A cache may
still be fetching from the upstream after its client got the last byte
(distribution's proxy stores a blob with a second fetch of its own), so the
harness also asks the registry how many requests are in flight before it
trusts the log.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from testbed.processes import free_port
from testbed.registry import DistributionRegistry

_IN_FLIGHT = re.compile(r"^registry_http_in_flight_requests\{[^}]*\} (\S+)$", re.MULTILINE)


class Upstream(DistributionRegistry):
    def __init__(self, workdir: Path) -> None:
        # Chosen before the parent writes the configuration.
        self.debug_port = free_port()
        super().__init__(workdir)

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["http"]["debug"] = {
            "addr": f"127.0.0.1:{self.debug_port}",
            "prometheus": {"enabled": True, "path": "/metrics"},
        }
        return config

    def in_flight(self) -> int:
        """Requests the registry is serving now, of every kind."""
        text = httpx.get(f"http://127.0.0.1:{self.debug_port}/metrics", timeout=10).text
        return sum(int(float(value)) for value in _IN_FLIGHT.findall(text))
