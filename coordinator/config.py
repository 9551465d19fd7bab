"""The coordinator's configuration: the ``coordinator:`` section of the YAML file.

``load_config`` reads the file (other sections belong to other components
and are ignored), applies environment overrides, converts every value and
validates the result. A bad value raises ``ConfigError`` whose message names
the key (``coordinator.membership_ttl: expected a duration such as 30s``)
and never the value of a secret.

Environment overrides are named ``SHOAL_COORDINATOR__<KEY>``:
``SHOAL_COORDINATOR__CLUSTER_SECRET`` sets ``coordinator.cluster_secret``,
``SHOAL_COORDINATOR__SENTINELS=a:26379,b:26379`` sets a list.

Redis credentials may come in ``redis_url`` (``rediss://user:password@host``,
as a managed Redis hands them out) or in ``redis_username`` and
``redis_password``. Either way they are lifted out of the URL when the
configuration is built, so the ``redis_url`` the coordinator keeps, logs
and shows in errors never holds them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from coordinator.errors import ConfigError
from protos.config_file import optional_string, parse_bind, parse_duration, parsed, positive_int, read_config_file

SECTION = "coordinator"
ENV_PREFIX = "SHOAL_COORDINATOR__"
CONFIG_ENV = "SHOAL_CONFIG"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def parse_any_bind(value: object) -> str:
    """``HOST:PORT`` to listen on, where port 0 picks a free port."""
    return parse_bind(value, any_port=True)


def _optional_bind(value: object) -> str:
    if value is None or str(value).strip() == "":
        return ""
    return parse_any_bind(value)


def _port(bind: str) -> int:
    return int(bind.rpartition(":")[2])


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT entries, got {value.strip()!r}")
    return host, int(port)


def _sentinels(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = [str(item) for item in value]
    else:
        raise ValueError("expected a list of HOST:PORT entries")
    for item in items:
        _host_port(item)
    return tuple(item.strip() for item in items)


def _redis_url(value: object) -> str | None:
    if value is None or value == "":
        return None
    url = str(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return url


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its user name and password, and the two (decoded), each None when absent.

    Both the user-info part (``redis://user:password@host``) and the query
    parameters redis-py also reads (``unix:///run/redis.sock?password=...``)
    are looked at.
    """
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "username":
            username = value or None
        elif name == "password":
            password = value or None
        else:
            query.append((name, value))
    if username is None and password is None:
        return url, None, None
    # Built by hand: urlunsplit would drop the empty host of unix:///path.
    kept = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    if query:
        kept += f"?{urlencode(query)}"
    return kept, username, password


def _string(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("expected a string")
    return str(value)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything a coordinator process needs; valid once constructed.

    Durations are seconds. Redis is reached either through ``redis_url`` or
    through Sentinel (``sentinels`` plus ``sentinel_service``), not both.
    Each field's ``help`` is what ``--help`` prints, so it is written for
    an operator.
    """

    bind: str = parsed(
        parse_any_bind, default="0.0.0.0:7000", help="HOST:PORT the gRPC server listens on; port 0 picks a free port"
    )
    metrics_bind: str = parsed(
        _optional_bind,
        default="0.0.0.0:7001",
        help="HOST:PORT serving the cluster's counters as Prometheus text at /metrics; "
        "port 0 picks a free port; empty disables it",
    )
    redis_url: str | None = parsed(
        _redis_url,
        default=None,
        help=f"a plain Redis, redis://HOST:PORT/DB, or rediss:// for TLS (default {DEFAULT_REDIS_URL} unless "
        "sentinels are set); a user name and password in it are taken out of it and never logged",
    )
    redis_username: str | None = parsed(optional_string, default=None, help="Redis ACL user name")
    redis_password: str | None = parsed(
        optional_string,
        default=None,
        repr=False,
        help="Redis password (AUTH); may be given in redis_url instead, never both (never logged)",
    )
    redis_tls_ca: str | None = parsed(
        optional_string,
        default=None,
        help="with a rediss:// redis_url: PEM CA bundle that issued Redis's certificate "
        "(default: the system's trusted CAs); the certificate and its host name are always verified",
    )
    redis_tls_cert: str | None = parsed(
        optional_string,
        default=None,
        help="with a rediss:// redis_url: PEM client certificate, for a Redis that asks for one "
        "(tls-auth-clients); with redis_tls_key",
    )
    redis_tls_key: str | None = parsed(
        optional_string, default=None, help="PEM private key of redis_tls_cert (unencrypted)"
    )
    sentinels: tuple[str, ...] = parsed(
        _sentinels,
        default=(),
        help="Sentinel addresses HOST:PORT (a list, or comma-separated); the master is asked for on every reconnect",
    )
    sentinel_service: str | None = parsed(
        optional_string, default=None, help="the service name the sentinels monitor (required with sentinels)"
    )
    key_prefix: str = parsed(
        _string, default="shoal:", help="every Redis key lives under this prefix, so clusters can share a Redis"
    )
    cluster_secret: str = parsed(
        _string,
        default="",
        repr=False,
        help="required; nodes send it as 'authorization: Bearer <secret>' on every call (never logged)",
    )
    membership_ttl: float = parsed(
        parse_duration,
        default=10.0,
        help="a node without a heartbeat for this long is dropped, with all its locations",
    )
    scheduler_interval: float = parsed(
        parse_duration, default=1.0, help="how often the scheduler renews its lead and sweeps expired content"
    )
    leader_lease: float = parsed(
        parse_duration,
        default=5.0,
        help="how long the sweep pauses when the leading replica dies; longer than scheduler_interval",
    )
    default_ttl: float = parsed(
        parse_duration,
        default=168 * 3600.0,
        help="TTL of announced content not scheduled yet (distribution's proxy ttl); 0 = never expires",
    )
    max_evictions: int = parsed(
        positive_int, default=1000, help="evictions handed to a node per heartbeat; the rest wait for the next"
    )
    threads: int = parsed(positive_int, default=32, help="threads serving calls; each call in progress holds one")
    shutdown_grace: float = parsed(
        parse_duration, default=5.0, help="on SIGTERM or SIGINT, calls in progress get this long to finish"
    )
    tls_cert: str | None = parsed(
        optional_string, default=None, help="PEM certificate file; with tls_key the server speaks TLS only"
    )
    tls_key: str | None = parsed(optional_string, default=None, help="PEM private key file for tls_cert")

    def __post_init__(self) -> None:
        self._lift_redis_credentials()
        if not self.cluster_secret:
            raise ConfigError(f"{SECTION}.cluster_secret: required; every node must send it")
        if self.membership_ttl <= 0:
            raise ConfigError(f"{SECTION}.membership_ttl: must be greater than 0")
        if self.scheduler_interval <= 0:
            raise ConfigError(f"{SECTION}.scheduler_interval: must be greater than 0")
        if self.leader_lease <= self.scheduler_interval:
            # The leader renews once per interval; a lease shorter than that
            # would lapse between renewals and flap between coordinators.
            raise ConfigError(f"{SECTION}.leader_lease: must be longer than scheduler_interval")
        if self.metrics_bind and _port(self.metrics_bind) != 0 and _port(self.metrics_bind) == _port(self.bind):
            raise ConfigError(f"{SECTION}.metrics_bind: must use another port than {SECTION}.bind")
        if self.sentinels and self.redis_url:
            raise ConfigError(f"{SECTION}.redis_url: set either redis_url or sentinels, not both")
        if self.sentinels and not self.sentinel_service:
            raise ConfigError(f"{SECTION}.sentinel_service: required with sentinels")
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise ConfigError(f"{SECTION}.{missing}: tls_cert and tls_key must be set together")
        self._check_redis_tls()
        for name in ("tls_cert", "tls_key", "redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{SECTION}.{name}: no such file {path}")

    def _lift_redis_credentials(self) -> None:
        """Move a user name and password found in ``redis_url`` to their own fields."""
        if not self.redis_url:
            return
        url, username, password = split_credentials(self.redis_url)
        if password and self.redis_password:
            raise ConfigError(f"{SECTION}.redis_password: the password is in redis_url too; give it once")
        if username and self.redis_username:
            raise ConfigError(f"{SECTION}.redis_username: the user name is in redis_url too; give it once")
        # The dataclass is frozen; this runs while it is being built.
        object.__setattr__(self, "redis_url", url)
        if password:
            object.__setattr__(self, "redis_password", password)
        if username:
            object.__setattr__(self, "redis_username", username)

    def _check_redis_tls(self) -> None:
        names = [name for name in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key") if getattr(self, name)]
        if names and not self.redis_tls:
            raise ConfigError(f"{SECTION}.{names[0]}: needs a rediss:// redis_url (TLS to Redis)")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            missing = "redis_tls_key" if self.redis_tls_cert else "redis_tls_cert"
            raise ConfigError(f"{SECTION}.{missing}: redis_tls_cert and redis_tls_key must be set together")

    @property
    def redis_tls(self) -> bool:
        """Whether the coordinator speaks TLS to Redis (a rediss:// URL)."""
        return urlsplit(self.effective_redis_url).scheme == "rediss"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [_host_port(item) for item in self.sentinels]

    def describe_redis(self) -> str:
        """Where Redis is and how it is reached, for log lines; never includes credentials."""
        if self.sentinels:
            where = f"sentinel service {self.sentinel_service} via {', '.join(self.sentinels)}"
        else:
            where = self.effective_redis_url
        if self.redis_username:
            where += f" as {self.redis_username}"
        if self.redis_password:
            where += " with a password"
        if self.redis_tls_cert:
            where += " and a client certificate" if self.redis_password else " with a client certificate"
        return where


def describe_keys() -> str:
    """Every key with its default, environment variable and meaning, for ``--help``."""
    lines = []
    for spec in dataclasses.fields(CoordinatorConfig):
        default = spec.default
        shown = "(none)" if default in (None, "", ()) or not spec.repr else _show(default)
        lines.append(f"  {SECTION}.{spec.name} [{ENV_PREFIX}{spec.name.upper()}] default {shown}")
        lines.append(f"      {spec.metadata['help']}")
    return "\n".join(lines)


def _show(value: object) -> str:
    if isinstance(value, float):
        for unit, seconds in (("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return f"{value / seconds:g}{unit}"
        return f"{value:g}s"
    return str(value)


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> CoordinatorConfig:
    """Read the YAML file at ``path`` (or ``$SHOAL_CONFIG``), apply overrides, validate.

    The file may be the one the nodes read; ``protos.config_file`` reads it
    for both, with the same messages.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    document = read_config_file(path, ConfigError) if path else {}
    section = document.get(SECTION)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: expected a mapping")
    return config_from_dict(section, environ)


def config_from_dict(section: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> CoordinatorConfig:
    """Build the config from the ``coordinator:`` mapping and ``SHOAL_COORDINATOR__*`` overrides."""
    raw = dict(section)
    for name, value in (environ or {}).items():
        if name.startswith(ENV_PREFIX):
            raw[name[len(ENV_PREFIX) :].lower()] = value
    fields = {spec.name: spec for spec in dataclasses.fields(CoordinatorConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{SECTION}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            values[name] = fields[name].metadata["parse"](value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{SECTION}.{name}: {exc}") from None
    return CoordinatorConfig(**values)
