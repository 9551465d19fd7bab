"""Building the Redis client from the configuration: a plain URL or Sentinel.

Every other module receives a ready ``redis.Redis`` (with
``decode_responses=True``) in its constructor and never knows which of the
two it got. With Sentinel, redis-py's own ``SentinelConnectionPool`` asks the
sentinels for the current master whenever it connects, so a failover costs
the calls in flight (answered UNAVAILABLE) and nothing else.
"""

from __future__ import annotations

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
    if config.sentinels:
        sentinel = Sentinel(
            config.sentinel_addresses,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
        )
        assert config.sentinel_service is not None  # Guaranteed by CoordinatorConfig validation.
        return sentinel.master_for(config.sentinel_service, **options)
    return redis.Redis.from_url(config.effective_redis_url, **options)
