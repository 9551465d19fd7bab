"""What the views of a node reach: one typed accessor instead of string keys.

``create_app`` builds the ``Services`` of a worker once and installs them on
the Flask app; a view asks ``services()`` for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from flask import Flask, current_app

if TYPE_CHECKING:
    from node.auth import Gate
    from node.config import NodeConfig
    from node.metrics import Metrics
    from node.storage.fill import Fills
    from node.storage.local import LocalStore
    from node.storage.proxy import ProxyStore

_EXTENSION = "shoal"


@dataclass(frozen=True)
class Services:
    config: NodeConfig
    # One proxy store per mirrored registry, by the registry's name.
    proxies: Mapping[str, ProxyStore]
    local: LocalStore
    fills: Fills
    metrics: Metrics
    # Who may pull what (``node.auth``).
    gate: Gate

    @property
    def cluster_secret(self) -> str:
        return self.config.cluster.secret or ""


def install(app: Flask, services: Services) -> None:
    app.extensions[_EXTENSION] = services


def services() -> Services:
    """The services of the app handling the current request."""
    return cast(Services, current_app.extensions[_EXTENSION])
