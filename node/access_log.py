"""gunicorn's access log, written by one thread of its own, off the request path.

gunicorn writes every access line from the worker that served the request,
formatting it and writing it under the handler's lock on the worker's event
loop. ``Logger`` (the node's ``logger_class``) keeps gunicorn's handlers
and format, and in each worker, once it has forked (``start_writer``, from
``post_worker_init``), puts a bounded queue in front of them: a request
only makes its line and puts the record on the queue, and one writer
thread adds the handlers' format (time, process) and writes, in order.

- The writer is a real OS thread, also under gevent's monkey patching
  (which turns ``threading.Thread`` into a greenlet): it blocks on the
  queue and in ``write(2)``, which must not stall the worker's clients. The
  queue is the C ``SimpleQueue`` for the same reason; putting on it never
  waits.
- When ``QUEUE_SIZE`` lines are waiting (whoever reads the log stalls: a
  full pipe, a slow disk), a line is dropped rather than making clients
  wait, counted in ``access_log.dropped`` (``shoal_access_log_dropped_total``)
  and reported in the error log at most every ``REPORT_INTERVAL``.
- The writer wakes at most every ``BATCH_INTERVAL`` and writes what came
  meanwhile in one write per handler. Woken for every line, it took the
  GIL from the worker's loop two thousand times a second: measured, that
  cost more CPU per request than the writes it took off the loop, and
  tripled the p99.
- ``stop_writer`` (``worker_exit``) writes what is queued, then stops.

Before the line is made, gunicorn builds every atom it knows (a dozen
fields, every request and response header, every environ variable) and
lower-cases them all: a third of the cost of logging a request. ``Logger``
builds only the atoms its format names, when it names only the simple
ones (``CHEAP_ATOMS``); any other format gets gunicorn's own ``access``.

The handlers stay on a logger of their own, ``gunicorn.access.writer``,
that nothing logs to: gunicorn's ``reopen_files`` (SIGUSR1, log rotation)
still finds and reopens them there.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import re
import time
from collections.abc import Callable
from logging.handlers import QueueHandler
from typing import Any, Protocol

from gevent.monkey import get_original
from gunicorn.glogging import Logger as GunicornLogger

from protos.metrics import ACCESS_LOG_DROPPED

# Lines waiting for the writer, at most: two seconds of a busy worker. A
# record is about 1.5 KiB, so a full queue holds about 6 MiB.
QUEUE_SIZE = 4096
# Drops are reported in the error log at most this often (seconds).
REPORT_INTERVAL = 10.0
# How long a stopping worker waits for the writer to write what is queued.
STOP_TIMEOUT = 5.0
# After the first line of a batch, the writer waits this long for the
# lines that follow it (seconds): lines reach the log at most this late.
BATCH_INTERVAL = 0.05
WRITER_LOGGER = "gunicorn.access.writer"

Atom = Callable[[Any, dict[str, Any], datetime.timedelta], object]

# The atoms of gunicorn's access_log_format made from the response, the
# environ and the time alone, exactly as gunicorn's ``Logger.atoms`` makes them.
CHEAP_ATOMS: dict[str, Atom] = {
    "h": lambda response, environ, took: environ.get("REMOTE_ADDR", "-"),
    "m": lambda response, environ, took: environ.get("REQUEST_METHOD"),
    "U": lambda response, environ, took: environ.get("PATH_INFO"),
    "q": lambda response, environ, took: environ.get("QUERY_STRING"),
    "H": lambda response, environ, took: environ.get("SERVER_PROTOCOL"),
    "s": lambda response, environ, took: _status(response),
    "B": lambda response, environ, took: getattr(response, "sent", None),
    "b": lambda response, environ, took: str(response.sent) if getattr(response, "sent", None) is not None else "-",
    "T": lambda response, environ, took: took.seconds,
    "D": lambda response, environ, took: took.seconds * 1_000_000 + took.microseconds,
    "M": lambda response, environ, took: took.seconds * 1000 + int(took.microseconds / 1000),
    "L": lambda response, environ, took: f"{took.seconds}.{took.microseconds:06d}",
}
_NAMED = re.compile(r"%\(([^)]*)\)")


def _status(response: Any) -> object:
    status = response.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


class Counter(Protocol):
    """Where dropped lines are counted (``node.metrics.Metrics``)."""

    def add(self, counter: str, value: int = 1) -> None: ...


class BoundedQueue:
    """The C ``SimpleQueue`` (not gevent's), with a bound: ``put_nowait`` raises ``queue.Full`` beyond it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._queue = get_original("queue", "SimpleQueue")()

    def put_nowait(self, item: object) -> None:
        if self._queue.qsize() >= self.size:
            raise queue.Full
        self._queue.put_nowait(item)

    def put_always(self, item: object) -> None:
        """Past the bound: the writer's stop signal must never be dropped."""
        self._queue.put_nowait(item)

    def get(self, block: bool = True) -> Any:
        return self._queue.get(block)

    def get_all(self) -> list[Any]:
        """Everything queued now, without waiting."""
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    def qsize(self) -> int:
        return self._queue.qsize()


class DroppingHandler(QueueHandler):
    """Puts records on the queue as they are; a record that finds the queue full is dropped and counted."""

    def __init__(self, lines: BoundedQueue, counter: Counter | None) -> None:
        super().__init__(lines)
        self.lines = lines
        self.counter = counter
        self.dropped = 0

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the queue is the only state, and it has its own.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The line's text now, so that the queue holds strings, not the
        # request's atoms; the writer's handlers add their format around it.
        # This handler is the only one to see the record: no copy needed.
        record.msg = record.getMessage()
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.counter is not None:
                self.counter.add(ACCESS_LOG_DROPPED)


class Writer:
    """Writes the queued records with the access log's handlers, on a real OS thread.

    What ``logging.handlers.QueueListener`` does, but not on a
    ``threading.Thread``, which would be a greenlet in a gevent worker;
    ``stop`` writes what is queued first.
    """

    _STOP = object()

    def __init__(self, lines: BoundedQueue, handler: DroppingHandler, handlers: list[logging.Handler]) -> None:
        self.lines = lines
        self.handler = handler
        self.handlers = handlers
        self._reported = 0
        self._reported_at = float("-inf")
        self._done = get_original("_thread", "allocate_lock")()

    def start(self) -> None:
        self._done.acquire()
        get_original("_thread", "start_new_thread")(self._run, ())

    def _run(self) -> None:
        # The unpatched sleep: gevent's would run a hub in this thread.
        sleep = get_original("time", "sleep")
        try:
            stopping = False
            while not stopping:
                batch = [self.lines.get()]
                if batch[0] is not self._STOP:
                    sleep(BATCH_INTERVAL)
                batch += self.lines.get_all()
                records = [record for record in batch if record is not self._STOP]
                stopping = len(records) < len(batch)
                for handler in self.handlers:
                    _write(handler, records)
                self._report()
            self._report(force=True)
        finally:
            self._done.release()

    def _report(self, force: bool = False) -> None:
        dropped = self.handler.dropped - self._reported
        if not dropped:
            return
        now = time.monotonic()
        if force or now - self._reported_at >= REPORT_INTERVAL:
            self._reported += dropped
            self._reported_at = now
            logging.getLogger("gunicorn.error").warning(
                "dropped %d access log lines: the log is written slower than requests arrive", dropped
            )

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Write what is queued, then end the thread; False when that took longer than ``timeout``.

        Waits in the kernel, so it blocks a gevent worker's loop: only for
        a worker that is exiting.
        """
        self.lines.put_always(self._STOP)
        return bool(self._done.acquire(timeout=timeout))


def _write(handler: logging.Handler, records: list[logging.LogRecord]) -> None:
    """What ``handler.handle`` does for each record; a stream handler writes them all at once."""
    records = [record for record in records if record.levelno >= handler.level]
    if not isinstance(handler, logging.StreamHandler) or handler.stream is None:
        for record in records:
            handler.handle(record)
        return
    lines = []
    for record in records:
        try:
            if handler.filter(record):
                lines.append(handler.format(record) + handler.terminator)
        except Exception:
            handler.handleError(record)
    if not lines:
        return
    # One write: the stream may be unbuffered (PYTHONUNBUFFERED, common in containers).
    with handler.lock or contextlib.nullcontext():
        try:
            handler.stream.write("".join(lines))
            handler.flush()
        except Exception:
            handler.handleError(records[-1])


class Logger(GunicornLogger):
    """gunicorn's logger; in a worker, its access lines go through ``Writer``."""

    def __init__(self, cfg: Any) -> None:
        self._writer: Writer | None = None
        self._writer_pid: int | None = None
        self._atoms: dict[str, Atom] | None = None
        super().__init__(cfg)

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        names = _NAMED.findall(cfg.access_log_format)
        cheap = all(name in CHEAP_ATOMS for name in names)
        self._atoms = {name: CHEAP_ATOMS[name] for name in names} if cheap else None

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: datetime.timedelta) -> None:
        """gunicorn's ``access``, building only the atoms the format names."""
        if self._atoms is None:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        atoms = {name: atom(resp, environ, request_time) for name, atom in self._atoms.items()}
        try:
            self.access_log.info(self.cfg.access_log_format, self.atoms_wrapper_class(atoms))
        except Exception:
            self.exception("writing the access log failed")

    def start_writer(self, counter: Counter | None = None, queue_size: int = QUEUE_SIZE) -> None:
        """In a worker process: move the access log's handlers behind the queue and its writer."""
        if self._writer is not None and self._writer_pid == os.getpid():
            return
        handlers = list(self.access_log.handlers)
        # They stay reachable for gunicorn's reopen_files, on a logger nobody logs to.
        owner = logging.getLogger(WRITER_LOGGER)
        owner.propagate = False
        owner.handlers = handlers
        lines = BoundedQueue(queue_size)
        handler = DroppingHandler(lines, counter)
        self.access_log.handlers = [handler]
        self._writer = Writer(lines, handler, handlers)
        self._writer_pid = os.getpid()
        self._writer.start()

    def stop_writer(self) -> None:
        """Write what is queued and stop the writer; idempotent, and nothing where none was started."""
        writer, self._writer = self._writer, None
        if writer is None or self._writer_pid != os.getpid():
            return
        if not writer.stop():
            self.error_log.warning("the access log writer did not finish within %ss", STOP_TIMEOUT)
        # Lines logged from now on (there should be none) are written directly again.
        logging.getLogger(WRITER_LOGGER).handlers = []
        self.access_log.handlers = list(writer.handlers)
