"""The node's configuration: one YAML file, then ``SHOAL_*`` overrides.

Each concern is a frozen dataclass. ``load_config`` reads the YAML file,
applies environment overrides, converts every value and validates it; a bad
value raises ``ConfigError`` whose message names the key (``upstream.ttl``),
never the value of a secret.

Environment overrides name a key by its path, upper-cased, sections joined
by a double underscore: ``SHOAL_UPSTREAM__PASSWORD`` sets
``upstream.password``, ``SHOAL_CACHE__MAX_SIZE`` sets ``cache.max_size``.

Distribution's ``proxy:`` section (``remoteurl``, ``username``, ``password``,
``ttl``) is accepted in place of ``upstream:`` so that an existing
distribution mirror configuration carries over unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "SHOAL_"
CONFIG_ENV = "SHOAL_CONFIG"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)


def parse_duration(value: object) -> float:
    """Seconds from a number or a Go-style duration (``168h``, ``1h30m``)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 168h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    text = str(value).strip()
    if text == "0":
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError("expected a duration such as 30s, 5m or 168h")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_size(value: object) -> int:
    """Bytes from a number or a size with a unit (``20GiB``, ``500M``)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 500MiB or 20GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise ValueError("expected a size such as 500MiB or 20GiB")
    number, unit = match.group(1), (match.group(2) or "").upper().rstrip("B")
    scale = 1
    if unit:
        base = 1024 if unit.endswith("I") else 1000
        scale = base ** ("KMGT".index(unit[0]) + 1)
    return int(float(number) * scale)


def parse_url(value: object) -> str:
    url = str(value).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the URL")
    return url


def parse_bind(value: object) -> str:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return text


def _positive_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a positive whole number")
    number = int(str(value))
    if number < 1:
        raise ValueError("expected a positive whole number")
    return number


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list):
        return tuple(str(item) for item in value)
    raise ValueError("expected a list of strings")


def _optional_string(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def _parsed(parse: Callable[[object], Any], **kwargs: Any) -> Any:
    return field(metadata={"parse": parse}, **kwargs)


@dataclass(frozen=True)
class ServerConfig:
    """How gunicorn serves the node."""

    bind: str = _parsed(parse_bind, default="0.0.0.0:5000")
    # gthread workers: each long blob download holds one thread, so
    # workers * threads is the number of downloads served at once.
    workers: int = _parsed(_positive_int, default=2)
    threads: int = _parsed(_positive_int, default=16)


@dataclass(frozen=True)
class CacheConfig:
    """The node's local content-addressed store."""

    dir: str = _parsed(str, default="./shoal-cache")
    # Above this many bytes of complete content the least recently used
    # content is evicted.
    max_size: int = _parsed(parse_size, default=20 * 1024**3)


@dataclass(frozen=True)
class UpstreamConfig:
    """The registry the node mirrors."""

    url: str = _parsed(parse_url, default="https://registry-1.docker.io")
    username: str | None = _parsed(_optional_string, default=None)
    password: str | None = _parsed(_optional_string, default=None, repr=False)
    # Distribution's proxy ttl: how long fetched content is kept; 0 keeps
    # it until it is evicted for space.
    ttl: float = _parsed(parse_duration, default=168 * 3600.0)
    # How long a tag -> digest answer is reused without asking the upstream.
    tag_ttl: float = _parsed(parse_duration, default=300.0)
    # Hosts that may receive the credentials as a token realm over plain
    # http. A realm over https, or on the upstream's own host, always may.
    token_realms: tuple[str, ...] = _parsed(_string_list, default=())
    # Seconds to wait for the upstream to connect or send the next bytes.
    timeout: float = _parsed(parse_duration, default=30.0)

    @property
    def is_docker_hub(self) -> bool:
        host = urlsplit(self.url).hostname or ""
        return host in ("registry-1.docker.io", "docker.io", "index.docker.io")


def _address_list(value: object) -> tuple[str, ...]:
    addresses = _string_list(value)
    for address in addresses:
        parse_bind(address)
    return addresses


@dataclass(frozen=True)
class ClusterConfig:
    """How the node joins a cluster; without coordinators it runs alone."""

    # Coordinator addresses (HOST:PORT); the node fails over between them.
    coordinators: tuple[str, ...] = _parsed(_address_list, default=())
    # Shared by the nodes and coordinators; guards gRPC and the peer endpoint.
    secret: str | None = _parsed(_optional_string, default=None, repr=False)
    # Defaults to the host and port of advertise_url.
    node_id: str | None = _parsed(_optional_string, default=None)
    # How other nodes reach this one; defaults to http://<hostname>:<port of server.bind>.
    advertise_url: str | None = _parsed(lambda v: None if not v else parse_url(v), default=None)
    heartbeat_interval: float = _parsed(parse_duration, default=2.0)
    # A fetch lease lives this long unless renewed; the holder renews it every
    # third of it, so a dead holder's fetch is taken over within this time.
    lease_ttl: float = _parsed(parse_duration, default=10.0)
    # Deadline of one call to one coordinator.
    timeout: float = _parsed(parse_duration, default=2.0)
    # CA certificate (PEM) of the coordinators' TLS certificates; plaintext without.
    tls_ca: str | None = _parsed(_optional_string, default=None)

    @property
    def enabled(self) -> bool:
        return bool(self.coordinators)


@dataclass(frozen=True)
class NodeConfig:
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def node_id(self) -> str:
        if self.cluster.node_id:
            return self.cluster.node_id
        parts = urlsplit(self.advertise_url)
        return f"{parts.hostname}-{parts.port or 80}"

    @property
    def advertise_url(self) -> str:
        if self.cluster.advertise_url:
            return self.cluster.advertise_url
        host, _, port = self.server.bind.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = socket.gethostname()
        return f"http://{host}:{port}"


# Distribution's proxy section, mapped onto ours.
_PROXY_KEYS = {"remoteurl": "url", "username": "username", "password": "password", "ttl": "ttl"}


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read the YAML file at ``path`` (or ``$SHOAL_CONFIG``), apply overrides."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = dict(loaded or {})
    return config_from_dict(raw, environ)


def config_from_dict(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> NodeConfig:
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    if "proxy" in raw:
        proxy = raw.pop("proxy")
        if not isinstance(proxy, dict):
            raise ConfigError("proxy: expected a mapping")
        upstream = raw.setdefault("upstream", {})
        for key, value in proxy.items():
            if key not in _PROXY_KEYS:
                raise ConfigError(f"proxy.{key}: unknown key (known: {', '.join(_PROXY_KEYS)})")
            upstream.setdefault(_PROXY_KEYS[key], value)
    for name, value in (environ or {}).items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if len(path) != 2:
            continue
        section = raw.setdefault(path[0], {})
        if isinstance(section, dict):
            section[path[1]] = value
    config: NodeConfig = _build(NodeConfig, raw, "")
    if config.cluster.enabled and not config.cluster.secret:
        raise ConfigError("cluster.secret: required when cluster.coordinators is set")
    return config


def _build(cls: type, raw: object, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        spec = fields[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(spec.default):
            values[name] = _build(type(spec.default), value or {}, f"{key}.")
            continue
        try:
            values[name] = spec.metadata["parse"](value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return cls(**values)
