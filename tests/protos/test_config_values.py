"""The value parsers node and coordinator share: one syntax for both sections."""

import math

import pytest

from coordinator.config import config_from_dict as coordinator_config
from node.config import ConfigError
from node.config import config_from_dict as node_config
from protos.config_file import non_negative_int, parse_bind, parse_duration, positive_int

SECRET = "s" * 32


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("1.5", 1.5), ("2m", 120), (" 1h30m ", 5400), (0, 0)])
def test_a_duration_is_read_the_same_by_node_and_coordinator(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert node_config({"upstream": {"ttl": text}}).upstream.ttl == seconds
    assert coordinator_config({"cluster_secret": SECRET, "default_ttl": text}).default_ttl == seconds


@pytest.mark.parametrize("bad", [-1, "-5s", "5 minutes", True, math.inf, "nan", ""])
def test_a_bad_duration_is_refused_by_both(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)
    with pytest.raises(ConfigError, match=r"^upstream\.ttl: expected a duration"):
        node_config({"upstream": {"ttl": bad}})


def test_whole_numbers() -> None:
    assert positive_int(" 3 ") == 3 and non_negative_int(0) == 0
    for bad in (0, -2, "1.5", True, "x"):
        with pytest.raises(ValueError, match="positive whole number"):
            positive_int(bad)
    for bad in (-1, "1.5", False):
        with pytest.raises(ValueError, match="0 or more"):
            non_negative_int(bad)


def test_port_zero_is_only_for_listeners_that_report_their_port() -> None:
    assert parse_bind("127.0.0.1:0", any_port=True) == "127.0.0.1:0"
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind("127.0.0.1:0")
    assert coordinator_config({"cluster_secret": SECRET, "bind": "127.0.0.1:0"}).bind == "127.0.0.1:0"
    with pytest.raises(ConfigError, match=r"^server\.bind: expected HOST:PORT"):
        node_config({"server": {"bind": "127.0.0.1:0"}})
    for bad in ("5000", ":5000", "host:65536", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_bind(bad, any_port=True)
