"""The access log through a bounded queue and one writer thread (node/access_log.py)."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger as GunicornLogger

from node import gunicorn_conf
from node.access_log import Logger
from protos.metrics import ACCESS_LOG_DROPPED
from testbed.fake_upstream import FakeUpstream
from testbed.images import build_image
from testbed.node import NodeProcess
from testbed.processes import wait_until

ROOT = Path(__file__).resolve().parents[2]


class Counts:
    def __init__(self) -> None:
        self.added: list[tuple[str, int]] = []

    def add(self, counter: str, value: int = 1) -> None:
        self.added.append((counter, value))


class Gate(logging.Handler):
    """A handler that holds every record until ``gate`` is set; ``entered`` is set once one waits there."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.lines: list[str] = []
        self.threads: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.threads.add(threading.get_ident())
        self.lines.append(record.getMessage())


@pytest.fixture(autouse=True)
def logging_state() -> Iterator[None]:
    """gunicorn's logger configures logging globally (dictConfig); put it back after each test."""
    loggers = [logging.root, *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg in [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        lg.handlers = []
    for lg, handlers, level, propagate, disabled in saved:
        lg.handlers, lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled


def _config(**settings: str) -> Config:
    config = Config()
    for name, value in {**vars(gunicorn_conf), **settings}.items():
        if name in config.settings:
            config.set(name, value)
    return config


def _logger(cls: type[GunicornLogger], stream: io.StringIO, **settings: str) -> GunicornLogger:
    """The node's gunicorn logger, its access lines written to ``stream``."""
    logger = cls(_config(**settings))
    for handler in logger.access_log.handlers:
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
    return logger


def _request(logger: GunicornLogger, path: str, user_agent: str = "skopeo/1.13") -> None:
    """What gunicorn's worker calls once it has answered a request."""
    response = SimpleNamespace(status="200 OK", sent=524, headers=[("Content-Type", "application/json")])
    request = SimpleNamespace(headers=[("HOST", "127.0.0.1"), ("USER-AGENT", user_agent)])
    environ = {
        "HTTP_USER_AGENT": user_agent,
        "REQUEST_METHOD": "GET",
        "RAW_URI": f"{path}?secret=1",
        "PATH_INFO": path,
        "QUERY_STRING": "secret=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
    }
    logger.access(response, request, environ, datetime.timedelta(microseconds=12_345))


def _without_time(text: str) -> list[str]:
    return [re.sub(r"\[\d[^]]*[ /:][^]]*\]", "[time]", line) for line in text.splitlines()]


def test_lines_keep_gunicorns_format() -> None:
    plain, queued = io.StringIO(), io.StringIO()
    _request(_logger(GunicornLogger, plain), "/v2/app/manifests/v1")
    logger = _logger(Logger, queued)
    assert isinstance(logger, Logger)
    logger.start_writer()
    _request(logger, "/v2/app/manifests/v1")
    logger.stop_writer()
    assert _without_time(queued.getvalue()) == _without_time(plain.getvalue())
    assert _without_time(queued.getvalue()) == [
        f'[time] [{os.getpid()}] [INFO] 127.0.0.1 "GET /v2/app/manifests/v1" 200 524 12ms'
    ]


@pytest.mark.parametrize(
    "access_log_format",
    [
        # Only atoms the node's logger builds itself; a quote in them is escaped as gunicorn does.
        '%(h)s %(m)s "%(U)s" %(q)s %(H)s %(s)s %(b)s %(B)s %(T)s %(D)s %(M)s %(L)s',
        # gunicorn's default: the other atoms come from gunicorn's own access().
        '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({user-agent}i)s',
    ],
)
def test_any_format_gives_gunicorns_line(access_log_format: str) -> None:
    plain, queued = io.StringIO(), io.StringIO()
    _request(_logger(GunicornLogger, plain, access_log_format=access_log_format), '/v2/a"b', 'curl "8"')
    logger = _logger(Logger, queued, access_log_format=access_log_format)
    assert isinstance(logger, Logger)
    logger.start_writer()
    _request(logger, '/v2/a"b', 'curl "8"')
    logger.stop_writer()
    assert _without_time(queued.getvalue()) == _without_time(plain.getvalue())
    assert '\\"' in queued.getvalue()


def test_lines_are_written_in_order_by_a_thread_of_their_own() -> None:
    logger = Logger(_config())
    gate = Gate()
    gate.gate.set()
    logger.access_log.handlers = [gate]
    logger.start_writer()
    for number in range(200):
        _request(logger, f"/v2/app/manifests/{number}")
    logger.stop_writer()
    assert [line.split('"')[1] for line in gate.lines] == [f"GET /v2/app/manifests/{n}" for n in range(200)]
    assert gate.threads and threading.get_ident() not in gate.threads


class GatedStream(io.StringIO):
    """A stream whose first write waits for ``gate``; ``writes`` counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().write(text)


def test_lines_that_wait_meanwhile_are_written_in_one_write() -> None:
    stream = GatedStream()
    logger = _logger(Logger, stream)
    assert isinstance(logger, Logger)
    logger.start_writer()
    _request(logger, "/first")
    assert stream.entered.wait(10)
    for number in range(100):
        _request(logger, f"/v2/app/manifests/{number}")
    stream.gate.set()
    logger.stop_writer()
    assert stream.writes == 2
    assert len(stream.getvalue().splitlines()) == 101


def test_a_full_queue_drops_and_counts_instead_of_waiting() -> None:
    logger = Logger(_config())
    gate, counts, errors = Gate(), Counts(), Gate()
    errors.gate.set()
    logger.access_log.handlers = [gate]
    logger.error_log.handlers = [errors]
    logger.start_writer(counts, queue_size=10)
    _request(logger, "/first")
    # The writer holds the first line; ten more fill the queue, five find it full.
    assert gate.entered.wait(10)
    for number in range(15):
        _request(logger, f"/queued/{number}")
    assert counts.added == [(ACCESS_LOG_DROPPED, 1)] * 5
    gate.gate.set()
    logger.stop_writer()
    assert len(gate.lines) == 11
    assert gate.lines[-1].split('"')[1] == "GET /queued/9"
    assert [line for line in errors.lines if "dropped" in line] == [
        "dropped 5 access log lines: the log is written slower than requests arrive"
    ]


def test_stopping_writes_what_is_queued_first() -> None:
    logger = Logger(_config())
    gate = Gate()
    logger.access_log.handlers = [gate]
    logger.start_writer()
    for number in range(50):
        _request(logger, f"/v2/app/manifests/{number}")
    assert gate.entered.wait(10)
    writer = logger._writer
    assert writer is not None
    stopping = threading.Thread(target=logger.stop_writer)
    stopping.start()
    # The writer holds the lines, stuck at the first; the stop waits behind them.
    wait_until(lambda: writer.lines.qsize() == 1, message="the stop was not queued")
    assert stopping.is_alive()
    gate.gate.set()
    stopping.join(10)
    assert not stopping.is_alive()
    assert len(gate.lines) == 50


def test_stopping_where_no_writer_started_does_nothing() -> None:
    stream = io.StringIO()
    logger = _logger(Logger, stream)
    assert isinstance(logger, Logger)
    logger.stop_writer()
    # The gunicorn master: lines are written directly, as gunicorn does.
    _request(logger, "/v2/")
    assert '"GET /v2/"' in stream.getvalue()


# Under gevent's monkey patching: the log's reader stalls (a pipe nobody
# reads); requests must neither wait for it nor stall the event loop.
_STALLED_PIPE = """
from gevent import monkey
monkey.patch_all()

import datetime, json, os, time
import gevent
from gevent.monkey import get_original
from types import SimpleNamespace
from gunicorn.config import Config
from node import gunicorn_conf
from node.access_log import Logger

config = Config()
for name, value in vars(gunicorn_conf).items():
    if name in config.settings:
        config.set(name, value)
logger = Logger(config)
read_end, write_end = os.pipe()
stream = os.fdopen(write_end, "w")
for handler in logger.access_log.handlers:
    handler.setStream(stream)
logger.start_writer(queue_size=1000)

ticks = []
def tick():
    for _ in range(50):
        gevent.sleep(0.001)
        ticks.append(1)
ticker = gevent.spawn(tick)
response = SimpleNamespace(status="200 OK", sent=1, headers=[])
environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/x", "PATH_INFO": "/x", "SERVER_PROTOCOL": "HTTP/1.1"}
started = time.monotonic()
for number in range(20_000):
    logger.access(response, SimpleNamespace(headers=[]), environ, datetime.timedelta())
    if number % 100 == 0:
        gevent.sleep(0)
elapsed = time.monotonic() - started
ticker.join(10)
dropped = logger._writer.handler.dropped

# Now read the pipe (from a real thread: stopping blocks the loop) and stop.
received = []
drained = get_original("_thread", "allocate_lock")()
drained.acquire()
def drain():
    while chunk := os.read(read_end, 1 << 16):
        received.append(chunk)
    drained.release()
get_original("_thread", "start_new_thread")(drain, ())
logger.stop_writer()
stream.close()
assert drained.acquire(timeout=20)
lines = b"".join(received).count(b"\\n")
print(json.dumps({"elapsed": elapsed, "ticks": len(ticks), "dropped": dropped, "lines": lines}))
"""


def test_under_gevent_a_stalled_log_neither_blocks_requests_nor_the_loop() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _STALLED_PIPE], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    # A pipe holds 64 KiB: most of the 20,000 lines found the queue full.
    assert result["dropped"] > 10_000
    assert result["ticks"] == 50
    assert result["elapsed"] < 10
    # Every line not dropped was written, and the writer said how many it dropped.
    assert result["lines"] == 20_000 - result["dropped"]
    reported = re.findall(r"dropped (\d+) access log lines", done.stderr)
    assert sum(int(count) for count in reported) == result["dropped"]


@pytest.mark.integration
def test_a_stopping_node_writes_every_line(tmp_path: Path) -> None:
    with FakeUpstream() as upstream:
        image = build_image([1000], seed="access-log")
        upstream.add_image("log/app", "v1", image)
        node = NodeProcess(tmp_path, upstream.url)
        try:
            with httpx.Client(base_url=node.url, timeout=10) as http:
                for number in range(300):
                    assert http.get(f"/v2/log/app/manifests/v1?n={number}").status_code == 200
        finally:
            node.stop()
    lines = [line for line in node.log_text().splitlines() if '"GET /v2/log/app/manifests/v1"' in line]
    assert len(lines) == 300
    line = r'\[[^]]+\] \[\d+\] \[INFO\] 127\.0\.0\.1 "GET /v2/log/app/manifests/v1" 200 \d+ \d+ms'
    assert all(re.fullmatch(line, logged) for logged in lines)


def test_the_node_runs_gunicorn_with_this_logger() -> None:
    assert _config().logger_class is Logger
