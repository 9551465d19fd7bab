"""Building the Redis client from the configuration: a plain URL or Sentinel.

A ``rediss://`` URL speaks TLS, verifying Redis's certificate and host name
against ``redis_tls_ca`` (else the system's CAs) and presenting
``redis_tls_cert`` when set.

Every other module receives a ready ``redis.Redis`` (with
``decode_responses=True``) in its constructor and never knows which of the
two it got. With Sentinel, redis-py's own ``SentinelConnectionPool`` asks the
sentinels for the current master whenever it connects, so a failover costs
the calls in flight (answered UNAVAILABLE) and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.sentinel import Sentinel

from coordinator.config import CoordinatorConfig

# A call that cannot reach Redis within these bounds is answered UNAVAILABLE,
# well inside the deadline a node gives each coordinator call.
SOCKET_TIMEOUT = 1.5
CONNECT_TIMEOUT = 1.0


def connect(config: CoordinatorConfig) -> redis.Redis:
    """Return a client for the configured Redis; it connects lazily, on first use."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": 30,
    }
    if config.redis_username:
        options["username"] = config.redis_username
    if config.redis_password:
        options["password"] = config.redis_password
    if config.redis_tls:
        # Spelled out rather than left to redis-py's defaults, which have
        # changed between versions (hostname checks were off before 6.0).
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        if config.redis_tls_ca:
            options["ssl_ca_certs"] = config.redis_tls_ca
        if config.redis_tls_cert:
            options["ssl_certfile"] = config.redis_tls_cert
            options["ssl_keyfile"] = config.redis_tls_key
    if config.sentinels:
        sentinel = Sentinel(
            config.sentinel_addresses,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        assert config.sentinel_service is not None  # Guaranteed by CoordinatorConfig validation.
        return sentinel.master_for(config.sentinel_service, **options)
    return redis.Redis.from_url(config.effective_redis_url, **options)


# The client is made with decode_responses=True, so every reply is text;
# redis-py's annotations cannot know that and say ``bytes | str``. These
# narrow a reply at the point it is read, and fail loudly if a client made
# without decoding ever slipped in.


def text(value: object) -> str:
    """One decoded reply."""
    if not isinstance(value, str):
        raise TypeError(f"expected a decoded Redis reply, got {type(value).__name__}")
    return value


def texts(values: Iterable[object]) -> list[str]:
    """A decoded list or set reply, as a list."""
    return [text(value) for value in values]


def text_map(mapping: Mapping[Any, Any]) -> dict[str, str]:
    """A decoded hash reply (HGETALL)."""
    return {text(key): text(value) for key, value in mapping.items()}
