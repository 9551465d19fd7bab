import pytest

from node.config import ConfigError, config_from_dict, load_config, parse_duration, parse_size


def test_defaults_follow_distribution() -> None:
    config = config_from_dict({})
    assert config.upstream.ttl == 168 * 3600
    assert config.upstream.url == "https://registry-1.docker.io"
    assert config.upstream.is_docker_hub


def test_the_upstream_minimum_rate_defaults_low_and_takes_a_size_per_second() -> None:
    assert (config_from_dict({}).upstream.min_rate, config_from_dict({}).upstream.min_rate_window) == (10 * 1024, 30.0)
    config = config_from_dict({"upstream": {"min_rate": "1MiB", "min_rate_window": "1m"}})
    assert (config.upstream.min_rate, config.upstream.min_rate_window) == (1024**2, 60.0)
    assert config_from_dict({"upstream": {"min_rate": 0}}).upstream.min_rate == 0


def test_distribution_proxy_section_carries_over(tmp_path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("proxy:\n  remoteurl: https://ghcr.io/\n  username: bob\n  password: hunter2\n  ttl: 24h\n")
    config = load_config(str(path), environ={})
    assert config.upstream.url == "https://ghcr.io"
    assert config.upstream.username == "bob"
    assert config.upstream.password == "hunter2"
    assert config.upstream.ttl == 24 * 3600
    assert not config.upstream.is_docker_hub


def test_environment_overrides_the_file(tmp_path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("upstream:\n  url: http://one.test\ncache:\n  max_size: 1GiB\n")
    env = {"SHOAL_UPSTREAM__URL": "http://two.test", "SHOAL_CACHE__MAX_SIZE": "2GiB", "SHOAL_UPSTREAM__TAG_TTL": "10s"}
    config = load_config(str(path), environ=env)
    assert config.upstream.url == "http://two.test"
    assert config.cache.max_size == 2 * 1024**3
    assert config.upstream.tag_ttl == 10


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"upstream": {"ttl": "forever"}}, "upstream.ttl"),
        ({"upstream": {"url": "ftp://x"}}, "upstream.url"),
        ({"cache": {"max_size": "lots"}}, "cache.max_size"),
        ({"server": {"bind": "nowhere"}}, "server.bind"),
        ({"server": {"workers": 0}}, "server.workers"),
        ({"upstream": {"colour": "blue"}}, "upstream.colour"),
        ({"bogus": {}}, "bogus"),
        ({"proxy": {"remoteurl": "http://x", "extra": 1}}, "proxy.extra"),
        ({"upstream": {"min_rate": "fast"}}, "upstream.min_rate"),
        ({"upstream": {"min_rate_window": "0s"}}, "upstream.min_rate_window"),
    ],
)
def test_bad_values_name_their_key(raw, key) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        config_from_dict(raw)


def test_secrets_stay_out_of_repr_and_errors() -> None:
    config = config_from_dict({"upstream": {"username": "bob", "password": "s3cret-pass"}})
    assert "s3cret-pass" not in repr(config)
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"upstream": {"url": "http://bob:s3cret-pass@x.test"}})
    assert "s3cret-pass" not in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yml"), environ={})


def test_extend_ttl_on_hit_defaults_on() -> None:
    assert config_from_dict({}).cache.extend_ttl_on_hit is True
    assert config_from_dict({}, {"SHOAL_CACHE__EXTEND_TTL_ON_HIT": "false"}).cache.extend_ttl_on_hit is False
    with pytest.raises(ConfigError, match=r"^cache\.extend_ttl_on_hit:"):
        config_from_dict({"cache": {"extend_ttl_on_hit": "sometimes"}})


def test_ratelimit_floor_is_per_upstream_and_zero_turns_it_off() -> None:
    assert config_from_dict({}).upstream.ratelimit_floor == 10
    assert config_from_dict({"upstream": {"ratelimit_floor": 0}}).upstream.ratelimit_floor == 0
    assert config_from_dict({}, {"SHOAL_UPSTREAM__RATELIMIT_FLOOR": "25"}).upstream.ratelimit_floor == 25
    several = config_from_dict(
        {"upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}, "ghcr.io": {"url": "https://ghcr.io"}}},
        {"SHOAL_UPSTREAMS__GHCR_IO__RATELIMIT_FLOOR": "3"},
    )
    assert [upstream.ratelimit_floor for upstream in several.upstreams] == [10, 3]
    for bad in (-1, "few", True, "1.5"):
        with pytest.raises(ConfigError, match=r"^upstream\.ratelimit_floor: expected a whole number, 0 or more$"):
            config_from_dict({"upstream": {"ratelimit_floor": bad}})


def test_units() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration(0) == 0
    assert parse_size("500MiB") == 500 * 1024**2
    assert parse_size("3KB") == 3000
    with pytest.raises(ValueError):
        parse_duration("-5s")


def test_min_free_is_a_size_a_percentage_or_the_smaller_of_both() -> None:
    gib = 1024**3
    default = config_from_dict({}).cache.min_free
    assert default.of(1000 * gib) == 2 * gib and default.of(10 * gib) == gib // 2
    assert config_from_dict({"cache": {"min_free": "5GiB"}}).cache.min_free.of(gib) == 5 * gib
    assert config_from_dict({"cache": {"min_free": "10%"}}).cache.min_free.of(100 * gib) == 10 * gib
    assert config_from_dict({"cache": {"min_free": 0}}).cache.min_free.of(gib) == 0
    assert config_from_dict({}, {"SHOAL_CACHE__MIN_FREE": "1GiB|1%"}).cache.min_free.of(1000 * gib) == gib
    for bad in ("lots", "150%", "-3%"):
        with pytest.raises(ConfigError, match=r"cache\.min_free"):
            config_from_dict({"cache": {"min_free": bad}})
