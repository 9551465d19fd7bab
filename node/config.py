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
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from protos.config_file import (
    non_negative_int,
    optional_string,
    parse_bind,
    parse_duration,
    parsed,
    positive_int,
    read_config_file,
)

ENV_PREFIX = "SHOAL_"
CONFIG_ENV = "SHOAL_CONFIG"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed."""


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)


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


class FreeSpace(NamedTuple):
    """Space to keep free on a filesystem: ``size`` bytes, ``percent`` of it, or the smaller of both.

    A value, not a section: ``_build`` takes every dataclass default for one.
    """

    size: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        """The bytes to keep free on a filesystem of ``total`` bytes."""
        limits = [self.size] if self.size is not None else []
        if self.percent is not None:
            limits.append(int(total * self.percent / 100))
        return min(limits) if limits else 0

    def __str__(self) -> str:
        parts = ([f"{self.size} bytes"] if self.size is not None else []) + (
            [f"{self.percent:g}%"] if self.percent is not None else []
        )
        return " or ".join(parts) + (", whichever is smaller" if len(parts) == 2 else "") if parts else "0"


def parse_free_space(value: object) -> FreeSpace:
    """A size (``5GiB``), a percentage of the filesystem (``5%``), or both as ``5GiB|5%`` (the smaller)."""
    if isinstance(value, FreeSpace):
        return value
    size: int | None = None
    percent: float | None = None
    for part in str(value).split("|") if isinstance(value, str) else [value]:
        text = str(part).strip()
        if isinstance(part, str) and text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError("expected a size such as 5GiB, a percentage such as 5%, or both as 5GiB|5%") from None
            if not 0 <= percent < 100:
                raise ValueError("a percentage must be from 0 to below 100")
        else:
            try:
                size = parse_size(part)
            except ValueError:
                raise ValueError("expected a size such as 5GiB, a percentage such as 5%, or both as 5GiB|5%") from None
    return FreeSpace(size, percent)


def parse_url(value: object) -> str:
    url = str(value).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the URL")
    return url


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list):
        return tuple(str(item) for item in value)
    raise ValueError("expected a list of strings")


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected a duration above 0, such as 30s")
    return seconds


@dataclass(frozen=True)
class ServerConfig:
    """How gunicorn serves the node (gevent workers: one greenlet per connection)."""

    bind: str = parsed(parse_bind, default="0.0.0.0:5000")
    # Processes; each serves any number of connections up to its share of
    # max_connections, so more workers buy CPU (hashing, parsing), not room.
    workers: int = parsed(positive_int, default=2)
    # Open client connections the node holds, shared evenly by its workers;
    # a connection beyond it is answered 503 with Retry-After at once.
    max_connections: int = parsed(positive_int, default=4096)
    # A client that accepts no bytes for this long is disconnected.
    send_timeout: float = parsed(parse_duration, default=60.0)
    # How long a connection may take to send a complete request head, idle
    # keep-alive time before it included; then it is closed.
    header_timeout: float = parsed(parse_duration, default=15.0)
    # A listener of its own for /metrics and /debug/vars (distribution's
    # debug address), which then leave server.bind; unset, they are served
    # on server.bind, behind auth when auth is on.
    metrics_bind: str | None = parsed(lambda v: None if not v else parse_bind(v), default=None)


@dataclass(frozen=True)
class CacheConfig:
    """The node's local content-addressed store."""

    dir: str = parsed(str, default="./shoal-cache")
    # Above this many bytes of complete content, plus what fills in flight
    # will write, the least recently used content is evicted.
    max_size: int = parsed(parse_size, default=20 * 1024**3)
    # Kept free on the cache's filesystem by evicting; a fill that would
    # leave less does not start (503 with Retry-After). A size, a percentage
    # of the filesystem, or both (the smaller): by default 2 GiB or 5%.
    # (FreeSpace is an immutable NamedTuple, which ruff cannot tell.)
    min_free: FreeSpace = parsed(parse_free_space, default=FreeSpace(2 * 1024**3, 5.0))  # noqa: RUF009
    # A hit pushes the content's expiry (upstream.ttl) forward, so content in
    # use never expires. False counts the TTL from the fetch, as distribution's
    # proxy does (which evicts popular layers a week after they were fetched).
    extend_ttl_on_hit: bool = parsed(_bool, default=True)
    # Fills (upstream or peer transfers) one node runs at once, whichever
    # workers run them, HEAD-started and abandoned ones included. A GET
    # beyond it waits for a free one (or follows a fill of the same blob)
    # for up to upstream.timeout, then gets 503 with Retry-After; a HEAD
    # beyond it is answered by asking the source without a fill. The
    # upstream's blob connections are capped by it too, so manifests and
    # tag checks always find a connection.
    max_fills: int = parsed(positive_int, default=16)
    # Memory for manifests, tag pointers and confirmed bindings, so that a
    # warm request touches no file; shared evenly by the workers (each
    # holds its own copies). 0 turns it off: every request reads the disk.
    memory: int = parsed(parse_size, default=32 * 1024**2)


@dataclass(frozen=True)
class UpstreamConfig:
    """A registry the node mirrors."""

    # The registry's name as clients say it: containerd's ns parameter
    # (docker.io, ghcr.io) and the path prefix of podman mirrors.
    name: str = parsed(lambda value: parse_registry_name(value), default="docker.io")
    url: str = parsed(parse_url, default="https://registry-1.docker.io")
    username: str | None = parsed(optional_string, default=None)
    password: str | None = parsed(optional_string, default=None, repr=False)
    # Distribution's proxy ttl: how long fetched content is kept, and how
    # long a digest stays confirmed for a repository (node.bindings); 0
    # keeps it until it is evicted for space.
    ttl: float = parsed(parse_duration, default=168 * 3600.0)
    # How long a tag -> digest answer is reused without asking the upstream.
    tag_ttl: float = parsed(parse_duration, default=300.0)
    # Hosts that may receive the credentials as a token realm over plain
    # http. A realm over https, or on the upstream's own host, always may.
    token_realms: tuple[str, ...] = parsed(_string_list, default=())
    # Seconds to wait for the upstream to connect or send the next bytes.
    timeout: float = parsed(parse_duration, default=30.0)
    # The slowest a body may come from the upstream (bytes a second,
    # averaged over each min_rate_window of the transfer): a slower one is
    # aborted; for a blob its lease is given back and the clients following
    # it fail (node.min_rate).
    # 0 turns the floor off.
    min_rate: int = parsed(parse_size, default=10 * 1024)
    min_rate_window: float = parsed(lambda v: _positive_duration(v), default=30.0)
    # When the upstream's ratelimit-remaining falls below this, tag checks
    # pause and cached tags are served stale, keeping what is left of the
    # budget for content the node does not hold (node.budget). 0 turns the
    # floor off; a 429 pauses tag checks whatever the floor.
    ratelimit_floor: int = parsed(non_negative_int, default=10)
    # With auth on: pulls from this registry need no credentials, from any
    # client or only from anonymous_networks (CIDRs) when given. Without
    # auth every pull is anonymous.
    anonymous: bool = parsed(_bool, default=False)
    anonymous_networks: tuple[str, ...] = parsed(lambda v: _networks(v), default=())

    @property
    def is_docker_hub(self) -> bool:
        """Docker Hub keeps official images under library/; only its names get it."""
        return self.name == DOCKER_HUB or registry_name_of(self.url) == DOCKER_HUB


def _networks(value: object) -> tuple[str, ...]:
    networks = _string_list(value)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not a network such as 10.0.0.0/8 or fd00::/8") from None
    return networks


@dataclass(frozen=True)
class HtpasswdConfig:
    """Distribution's ``auth.htpasswd``: users with bcrypt hashes (``htpasswd -B``)."""

    realm: str = parsed(str, default="shoal")
    path: str | None = parsed(optional_string, default=None)


@dataclass(frozen=True)
class TokenConfig:
    """Distribution's ``auth.token``: bearer JWTs from a token server."""

    # Where clients get tokens (the challenge names it).
    realm: str | None = parsed(lambda v: None if not v else parse_url(v), default=None)
    # The token's aud; the challenge names it too.
    service: str | None = parsed(optional_string, default=None)
    # The token's iss.
    issuer: str | None = parsed(optional_string, default=None)
    # PEM certificates whose keys sign tokens (or issued the token's x5c certificate).
    rootcertbundle: str | None = parsed(optional_string, default=None)


@dataclass(frozen=True)
class AuthConfig:
    """Who may pull: htpasswd users or token server tokens; neither admits everyone."""

    htpasswd: HtpasswdConfig = HtpasswdConfig()
    token: TokenConfig = TokenConfig()

    @property
    def enabled(self) -> bool:
        return bool(self.htpasswd.path or self.token.realm)


def _address_list(value: object) -> tuple[str, ...]:
    addresses = _string_list(value)
    for address in addresses:
        parse_bind(address)
    return addresses


@dataclass(frozen=True)
class ClusterConfig:
    """How the node joins a cluster; without coordinators it runs alone."""

    # Coordinator addresses (HOST:PORT); the node fails over between them.
    coordinators: tuple[str, ...] = parsed(_address_list, default=())
    # Shared by the nodes and coordinators; guards gRPC and the peer endpoint.
    secret: str | None = parsed(optional_string, default=None, repr=False)
    # Defaults to the host and port of advertise_url.
    node_id: str | None = parsed(optional_string, default=None)
    # How other nodes reach this one; defaults to http://<hostname>:<port of server.bind>.
    advertise_url: str | None = parsed(lambda v: None if not v else parse_url(v), default=None)
    heartbeat_interval: float = parsed(parse_duration, default=2.0)
    # A fetch lease lives this long unless renewed; the holder renews it every
    # quarter of it, so a dead holder's fetch is taken over within this time
    # (docs/cluster.md, "A dead fetcher").
    lease_ttl: float = parsed(parse_duration, default=3.0)
    # Deadline of one call to one coordinator.
    timeout: float = parsed(parse_duration, default=2.0)
    # CA certificate (PEM) of the coordinators' TLS certificates; plaintext without.
    tls_ca: str | None = parsed(optional_string, default=None)

    @property
    def enabled(self) -> bool:
        return bool(self.coordinators)


_REGISTRY_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?")
DOCKER_HUB = "docker.io"


def parse_registry_name(value: object) -> str:
    name = str(value).strip().lower()
    if not _REGISTRY_NAME.fullmatch(name) or ".." in name:
        raise ValueError("expected a registry name such as docker.io, ghcr.io or registry.local:5000")
    return name


def registry_name_of(url: str) -> str:
    """The name clients use for the registry at ``url``: docker.io for Docker Hub."""
    host = urlsplit(url).netloc.lower()
    return DOCKER_HUB if host in ("registry-1.docker.io", "index.docker.io", "docker.io") else host


@dataclass(frozen=True)
class NodeConfig:
    server: ServerConfig = ServerConfig()
    cache: CacheConfig = CacheConfig()
    # The registries this node mirrors, by name; see ``load_config``.
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(),)
    # Where requests that name no registry go; None answers them 404.
    default_upstream: str | None = DOCKER_HUB
    cluster: ClusterConfig = ClusterConfig()
    auth: AuthConfig = AuthConfig()

    @property
    def upstream(self) -> UpstreamConfig:
        """The default upstream, or the first: where node-wide defaults (timeouts) come from."""
        return self.find_upstream(self.default_upstream) or self.upstreams[0]

    def find_upstream(self, name: str | None) -> UpstreamConfig | None:
        return next((upstream for upstream in self.upstreams if upstream.name == name), None)

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
    raw = read_config_file(path, ConfigError) if path else {}
    return config_from_dict(raw, environ)


def config_from_dict(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Build the configuration from parsed YAML and ``SHOAL_*`` overrides.

    Upstreams come in one of three forms: ``upstreams:`` (a mapping from
    registry name to settings, with ``default_upstream`` naming the one for
    requests that name no registry; a single upstream is the default);
    ``upstream:`` (one registry, named after its URL: docker.io for Docker
    Hub); or distribution's ``proxy:`` (the same, with distribution's keys).
    """
    raw = {key: _copy(value) for key, value in raw.items()}
    if "proxy" in raw:
        proxy = raw.pop("proxy")
        if not isinstance(proxy, dict):
            raise ConfigError("proxy: expected a mapping")
        upstream = raw.setdefault("upstream", {})
        if not isinstance(upstream, dict):
            raise ConfigError("upstream: expected a mapping")
        for key, value in proxy.items():
            if key not in _PROXY_KEYS:
                raise ConfigError(f"proxy.{key}: unknown key (known: {', '.join(_PROXY_KEYS)})")
            upstream.setdefault(_PROXY_KEYS[key], value)
    _apply_environment(raw, environ or {})
    # A shared file (and environment) may configure the coordinator too;
    # that part is the coordinator's own.
    raw.pop("coordinator", None)
    upstreams = _upstreams(raw)
    config: NodeConfig = _build(NodeConfig, raw, "")
    config = dataclasses.replace(config, **upstreams)
    if config.cluster.enabled and not config.cluster.secret:
        raise ConfigError("cluster.secret: required when cluster.coordinators is set")
    _check_auth(config)
    return config


def _check_auth(config: NodeConfig) -> None:
    auth = config.auth
    if auth.htpasswd.path and auth.token.realm:
        raise ConfigError("auth: give either htpasswd or token, not both")
    if auth.token.realm:
        for key in ("service", "issuer", "rootcertbundle"):
            if not getattr(auth.token, key):
                raise ConfigError(f"auth.token.{key}: required with auth.token.realm")
    elif any(getattr(auth.token, key) for key in ("service", "issuer", "rootcertbundle")):
        raise ConfigError("auth.token.realm: required with the other auth.token keys")
    metrics_bind = config.server.metrics_bind
    if metrics_bind is not None and metrics_bind.rpartition(":")[2] == config.server.bind.rpartition(":")[2]:
        raise ConfigError("server.metrics_bind: must be another port than server.bind")


def _copy(value: Any) -> Any:
    return {key: _copy(item) for key, item in value.items()} if isinstance(value, dict) else value


def _env_name(registry: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", registry.upper())


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``SHOAL_KEY``, ``SHOAL_SECTION__KEY`` and ``SHOAL_UPSTREAMS__<NAME>__KEY``.

    In the last form NAME is a registry of the file's ``upstreams:`` in
    capitals with every other character as ``_`` (GHCR_IO for ghcr.io).
    """
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_ENV:
            continue
        path = variable[len(ENV_PREFIX) :].split("__")
        if len(path) == 1:
            raw[path[0].lower()] = value
        elif len(path) == 2:
            section = raw.setdefault(path[0].lower(), {})
            if isinstance(section, dict):
                section[path[1].lower()] = value
        elif len(path) == 3 and path[0] != "UPSTREAMS":
            section = raw.setdefault(path[0].lower(), {})
            if isinstance(section, dict):
                subsection = section.setdefault(path[1].lower(), {})
                if isinstance(subsection, dict):
                    subsection[path[2].lower()] = value
        elif len(path) == 3 and path[0] == "UPSTREAMS":
            upstreams = raw.get("upstreams")
            declared: dict[str, Any] = upstreams if isinstance(upstreams, dict) else {}
            names = [name for name in declared if _env_name(str(name)) == path[1]]
            if not names:
                raise ConfigError(f"{variable}: no upstream in upstreams: is named like {path[1]}")
            settings = declared[names[0]]
            if settings is None:
                settings = declared[names[0]] = {}
            if isinstance(settings, dict):
                settings[path[2].lower()] = value


def _upstreams(raw: dict[str, Any]) -> dict[str, Any]:
    """Take the upstream settings out of ``raw`` and build them."""
    single, several = raw.pop("upstream", None), raw.pop("upstreams", None)
    default = raw.pop("default_upstream", None)
    if single is not None and several is not None:
        raise ConfigError("upstreams: give either upstream (one registry) or upstreams (several), not both")
    if several is None:
        settings = _build(UpstreamConfig, single or {}, "upstream.")
        if single and "name" not in single:
            settings = dataclasses.replace(settings, name=registry_name_of(settings.url))
        return {"upstreams": (settings,), "default_upstream": settings.name}
    if not isinstance(several, dict) or not several:
        raise ConfigError("upstreams: expected a mapping from registry name to its settings")
    built = []
    for name, settings in several.items():
        try:
            registry = parse_registry_name(name)
        except ValueError as exc:
            raise ConfigError(f"upstreams.{name}: {exc}") from None
        if not isinstance(settings, dict) or "url" not in settings:
            raise ConfigError(f"upstreams.{name}.url: required")
        built.append(dataclasses.replace(_build(UpstreamConfig, settings, f"upstreams.{name}."), name=registry))
    names = [upstream.name for upstream in built]
    if default is None and len(built) == 1:
        default = names[0]
    if default is not None and default not in names:
        raise ConfigError(f"default_upstream: {default} is not one of upstreams ({', '.join(names)})")
    return {"upstreams": tuple(built), "default_upstream": default}


def _build(cls: type, raw: object, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if prefix == "server." and "threads" in unknown:
        raise ConfigError(
            "server.threads: no longer used: gevent workers serve server.max_connections connections per node"
        )
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
