"""The gunicorn settings the node runs with."""

from __future__ import annotations

from gunicorn.config import Config

from node import gunicorn_conf


def _config() -> Config:
    config = Config()
    for name, value in vars(gunicorn_conf).items():
        if name in config.settings:
            config.set(name, value)
    return config


def test_hits_go_out_with_sendfile(monkeypatch) -> None:
    # gunicorn's sendfile setting can only switch sendfile off; the node
    # must leave it unset (and nothing in the environment may say no).
    monkeypatch.delenv("SENDFILE", raising=False)
    assert _config().sendfile is True


def test_gevent_workers_with_the_node_socket_and_the_control_socket_is_off() -> None:
    config = _config()
    assert config.worker_class_str == "node.serving.Worker"
    assert config.settings["control_socket_disable"].get() is True
