"""The YAML file node and coordinator may share, and the values it holds.

One file can configure both components (``upstreams:`` and ``server:`` for
the nodes, ``coordinator:`` for the coordinator), so both read it with the
same rules and the same messages: a file that cannot be read, is not YAML
or does not hold a mapping raises the caller's configuration error, naming
the file but never its contents.

The value parsers below are the ones both components take: a duration, a
count or an address written in one section means the same in the other.
Each raises ``ValueError`` with a hint of what was expected and never
repeats the value (it may be a secret put in the wrong key); the caller
names the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import field
from typing import Any

import yaml

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HINT = "expected a duration such as 30s, 5m or 168h"


def read_config_file(path: str, error: type[Exception]) -> dict[str, Any]:
    """The top-level mapping of the YAML file at ``path`` (empty for an empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as exc:
        raise error(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"config file {path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise error(f"config file {path} must hold a mapping at the top level")
    return document


def parsed(parse: Callable[[object], Any], *, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field whose raw value ``parse`` converts; ``help`` is what ``--help`` prints."""
    return field(metadata={"parse": parse, "help": help}, **kwargs)


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a Go-style duration (``500ms``, ``1h30m``, ``168h``)."""
    if isinstance(value, bool):
        raise ValueError(_DURATION_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(number + unit for number, unit in parts) == text:
            seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(_DURATION_HINT) from None
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(_DURATION_HINT)
    return seconds


def _whole(value: object, least: int, hint: str) -> int:
    if isinstance(value, bool):
        raise ValueError(hint)
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(hint) from None
    if number < least:
        raise ValueError(hint)
    return number


def positive_int(value: object) -> int:
    """A whole number, 1 or more."""
    return _whole(value, 1, "expected a positive whole number")


def non_negative_int(value: object) -> int:
    """A whole number, 0 or more."""
    return _whole(value, 0, "expected a whole number, 0 or more")


def parse_bind(value: object, *, any_port: bool = False) -> str:
    """``HOST:PORT`` to listen on; port 0 (the kernel picks one) only with ``any_port``."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError("expected HOST:PORT, such as 0.0.0.0:7000")
    return text


def optional_string(value: object) -> str | None:
    """A string, or None for a missing or empty value."""
    return None if value is None or value == "" else str(value)
