"""The YAML file node and coordinator may share: read once, the same way.

One file can configure both components (``upstreams:`` and ``server:`` for
the nodes, ``coordinator:`` for the coordinator), so both read it with the
same rules and the same messages: a file that cannot be read, is not YAML
or does not hold a mapping raises the caller's configuration error, naming
the file but never its contents.
"""

from __future__ import annotations

from typing import Any

import yaml


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
