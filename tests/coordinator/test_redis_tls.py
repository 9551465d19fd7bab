"""The coordinator reaching Redis over TLS (``rediss://``), with a password and a client certificate.

A real redis-server (Debian's, built with TLS) listens with TLS only and
asks every client for a certificate; the CA and the certificates are made
by the test (``testbed.tls``). The coordinator is configured as an operator
would, the password inside the URL a managed Redis hands out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import redis

from coordinator.config import CoordinatorConfig, config_from_dict
from coordinator.keys import Keys
from coordinator.redis_client import connect
from coordinator.server import CoordinatorServer
from node.coordinator_client import CoordinatorClient
from testbed.redis_server import RedisServer, RedisTLS
from testbed.tls import CertificateAuthority

pytestmark = pytest.mark.integration

SECRET = "cluster-secret-for-the-tls-tests"
PASSWORD = "redis-password-for-the-tls-tests"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("redis-ca"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[RedisServer]:
    # The server's certificate names 127.0.0.1 only, so that "localhost"
    # shows whether host names are checked.
    tls = RedisTLS(server=ca.issue("redis", ("127.0.0.1",)), ca=ca.ca, client=ca.issue("fixture"))
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), password=PASSWORD, tls=tls)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def settings(tls_redis: RedisServer, ca: CertificateAuthority) -> dict[str, object]:
    """The coordinator: section that reaches ``tls_redis``."""
    client = ca.issue("coordinator")
    return {
        "bind": "127.0.0.1:0",
        "metrics_bind": "",
        "cluster_secret": SECRET,
        "redis_url": f"rediss://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0",
        "redis_tls_ca": str(ca.ca),
        "redis_tls_cert": str(client.cert),
        "redis_tls_key": str(client.key),
        "key_prefix": "tls-test:",
    }


def test_the_coordinator_serves_with_its_state_in_redis_over_tls(
    tls_redis: RedisServer, settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    config = config_from_dict(settings)
    assert config.redis_tls
    with CoordinatorServer(config) as server, CoordinatorClient([server.address], SECRET, "node-tls") as node:
        node.register("http://node-tls:5000")
    with tls_redis.client() as client:
        assert client.smembers(Keys("tls-test:").nodes()) == {"node-tls"}
    assert PASSWORD not in caplog.text


def _refused(config: CoordinatorConfig) -> redis.RedisError:
    with connect(config) as client, pytest.raises(redis.RedisError) as caught:
        client.ping()
    assert PASSWORD not in str(caught.value)
    return caught.value


def test_redis_is_refused_when_its_certificate_does_not_verify(
    tls_redis: RedisServer, settings: dict[str, object]
) -> None:
    config = config_from_dict(settings)
    with connect(config) as client:
        assert client.ping()

    # The system's CAs, which never issued the test CA's certificates.
    without_ca = dataclasses.replace(config, redis_tls_ca=None)
    assert "certificate verify failed" in str(_refused(without_ca))

    # Reached by a name its certificate does not have.
    other_name = dataclasses.replace(config, redis_url=f"rediss://localhost:{tls_redis.port}/0")
    assert "mismatch" in str(_refused(other_name)).lower()


def test_redis_refuses_a_coordinator_without_its_certificate_or_password(
    tls_redis: RedisServer, settings: dict[str, object]
) -> None:
    config = config_from_dict(settings)
    _refused(dataclasses.replace(config, redis_tls_cert=None, redis_tls_key=None))
    assert isinstance(_refused(dataclasses.replace(config, redis_password=None)), redis.AuthenticationError)
    assert isinstance(_refused(dataclasses.replace(config, redis_password="wrong")), redis.AuthenticationError)
    plaintext = dataclasses.replace(
        config,
        redis_url=f"redis://127.0.0.1:{tls_redis.port}/0",
        redis_tls_ca=None,
        redis_tls_cert=None,
        redis_tls_key=None,
    )
    _refused(plaintext)
