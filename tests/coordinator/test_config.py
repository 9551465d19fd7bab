"""Loading and validating the coordinator's configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig, config_from_dict, load_config, parse_duration
from coordinator.errors import ConfigError
from coordinator.server import build_parser

SECRET = "s3cret-value-for-tests"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shoal.yaml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    config = CoordinatorConfig(cluster_secret=SECRET)

    assert config.bind == "0.0.0.0:7000"
    assert config.metrics_bind == "0.0.0.0:7001"
    assert config.effective_redis_url == "redis://127.0.0.1:6379/0"
    assert config.key_prefix == "shoal:"
    assert (config.membership_ttl, config.scheduler_interval, config.leader_lease) == (10.0, 1.0, 5.0)
    assert config.default_ttl == 168 * 3600
    assert config.tls_cert is None and config.tls_key is None


def test_yaml_section_other_sections_ignored_and_env_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
upstream:
  url: https://registry-1.docker.io
coordinator:
  bind: 127.0.0.1:7100
  redis_url: redis://redis.internal:6379/2
  membership_ttl: 30s
  default_ttl: 1h30m
  max_evictions: 50
""",
    )
    environ = {
        "SHOAL_COORDINATOR__CLUSTER_SECRET": SECRET,
        "SHOAL_COORDINATOR__KEY_PREFIX": "mirror:",
        "SHOAL_COORDINATOR__MEMBERSHIP_TTL": "15s",
        "SHOAL_UPSTREAM__URL": "https://ignored.example",
    }

    config = load_config(path, environ)

    assert config.bind == "127.0.0.1:7100"
    assert config.redis_url == "redis://redis.internal:6379/2"
    assert config.membership_ttl == 15.0
    assert config.default_ttl == 5400.0
    assert config.max_evictions == 50
    assert config.key_prefix == "mirror:"
    assert config.cluster_secret == SECRET


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "coordinator:\n  cluster_secret: from-file\n")
    assert load_config(None, {"SHOAL_CONFIG": path}).cluster_secret == "from-file"


def test_metrics_bind_empty_disables_and_port_zero_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "coordinator:\n  metrics_bind: 127.0.0.1:7001\n")
    environ = {"SHOAL_COORDINATOR__CLUSTER_SECRET": SECRET}

    assert load_config(path, environ).metrics_bind == "127.0.0.1:7001"
    assert load_config(path, {**environ, "SHOAL_COORDINATOR__METRICS_BIND": ""}).metrics_bind == ""
    assert config_from_dict({"cluster_secret": SECRET, "metrics_bind": None}).metrics_bind == ""
    both_free = config_from_dict({"cluster_secret": SECRET, "bind": "127.0.0.1:0", "metrics_bind": "127.0.0.1:0"})
    assert both_free.metrics_bind == "127.0.0.1:0"


def test_sentinels() -> None:
    config = config_from_dict(
        {"cluster_secret": SECRET, "sentinels": ["10.0.0.1:26379", "10.0.0.2:26379"], "sentinel_service": "shoal"}
    )
    assert config.sentinel_addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert "shoal" in config.describe_redis()

    from_env = config_from_dict(
        {"cluster_secret": SECRET},
        {"SHOAL_COORDINATOR__SENTINELS": "a:1, b:2", "SHOAL_COORDINATOR__SENTINEL_SERVICE": "m"},
    )
    assert from_env.sentinels == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"membership_ttl": "soon"}, "coordinator.membership_ttl: expected a duration such as 30s"),
        ({"membership_ttl": "0"}, "coordinator.membership_ttl: must be greater than 0"),
        ({"default_ttl": -1}, "coordinator.default_ttl: expected a duration"),
        ({"scheduler_interval": "2s", "leader_lease": "1s"}, "coordinator.leader_lease: must be longer"),
        ({"max_evictions": 0}, "coordinator.max_evictions: expected a positive whole number"),
        ({"bind": "7000"}, "coordinator.bind: expected HOST:PORT"),
        ({"metrics_bind": "7001"}, "coordinator.metrics_bind: expected HOST:PORT"),
        ({"metrics_bind": "127.0.0.1:7000"}, "coordinator.metrics_bind: must use another port than coordinator.bind"),
        ({"redis_url": "http://redis:6379"}, "coordinator.redis_url: expected a redis://"),
        (
            {"redis_url": "redis://:pw@redis:6379", "redis_password": "pw"},
            "coordinator.redis_password: the password is in redis_url too",
        ),
        (
            {"redis_url": "redis://u:pw@redis:6379", "redis_username": "u"},
            "coordinator.redis_username: the user name is in redis_url too",
        ),
        ({"redis_tls_ca": "/etc/ca.pem"}, "coordinator.redis_tls_ca: needs a rediss:// redis_url"),
        (
            {"redis_url": "rediss://r:6380", "redis_tls_cert": "/etc/c.pem"},
            "coordinator.redis_tls_key: redis_tls_cert and redis_tls_key must be set together",
        ),
        (
            {"redis_url": "rediss://r:6380", "redis_tls_ca": "/nonexistent.pem"},
            "coordinator.redis_tls_ca: no such file",
        ),
        ({"sentinels": ["nohost"]}, "coordinator.sentinels: expected HOST:PORT"),
        ({"sentinels": ["a:1"]}, "coordinator.sentinel_service: required with sentinels"),
        (
            {"sentinels": ["a:1"], "sentinel_service": "m", "redis_url": "redis://r:6379"},
            "coordinator.redis_url: set either",
        ),
        ({"tls_cert": "/etc/cert.pem"}, "coordinator.tls_key: tls_cert and tls_key must be set together"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "coordinator.tls_cert: no such file"),
        ({"unknown_key": 1}, "coordinator.unknown_key: unknown key"),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"cluster_secret": SECRET, **raw})
    assert str(caught.value).startswith(message)


def test_the_cluster_secret_is_required_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"coordinator\.cluster_secret: required"):
        config_from_dict({})

    config = config_from_dict({"cluster_secret": SECRET, "redis_password": "redis-pass"})
    assert SECRET not in repr(config) and "redis-pass" not in repr(config)
    assert SECRET not in config.describe_redis()

    path = write(tmp_path, f"coordinator:\n  cluster_secret: {SECRET}\n  membership_ttl: never\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert SECRET not in str(caught.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"), {})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "coordinator: [unclosed\n"), {})
    with pytest.raises(ConfigError, match="coordinator: expected a mapping"):
        load_config(write(tmp_path, "coordinator: 3\n"), {})


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("168h", 604800), ("1h30m", 5400), ("0", 0), (7, 7)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_help_explains_every_key() -> None:
    text = build_parser().format_help()
    for spec in dataclasses.fields(CoordinatorConfig):
        assert f"coordinator.{spec.name}" in text
        assert f"SHOAL_COORDINATOR__{spec.name.upper()}" in text
    assert "--config" in text and "--bind" in text


@pytest.mark.parametrize(
    ("url", "kept", "username"),
    [
        ("rediss://default:s%40cr3t%3Ak3y@redis.example:6380/1", "rediss://redis.example:6380/1", "default"),
        ("redis://:s@cr3t:k3y@10.0.0.5:6379/0", "redis://10.0.0.5:6379/0", None),
        ("unix:///run/redis.sock?db=2&password=s@cr3t:k3y", "unix:///run/redis.sock?db=2", None),
    ],
)
def test_credentials_in_the_redis_url_are_lifted_out_of_it(url: str, kept: str, username: str | None) -> None:
    # A managed Redis hands out one URL with its password in it; the
    # coordinator takes it as it is, and keeps the URL without it.
    config = config_from_dict({"cluster_secret": SECRET}, {"SHOAL_COORDINATOR__REDIS_URL": url})
    assert config.redis_password == "s@cr3t:k3y"
    assert config.redis_username == username
    assert config.redis_url == kept
    for shown in (repr(config), config.describe_redis(), config.effective_redis_url):
        assert "cr3t" not in shown and "k3y" not in shown
    assert config.describe_redis().endswith("with a password")


def test_redis_tls_settings() -> None:
    plain = config_from_dict({"cluster_secret": SECRET, "redis_url": "redis://r:6379/0"})
    assert not plain.redis_tls
    config = config_from_dict({"cluster_secret": SECRET, "redis_url": "rediss://r:6380/0"})
    assert config.redis_tls and config.redis_tls_ca is None
