"""Blocking system calls kept off a gevent worker's event loop.

Under gevent every client of a worker shares one thread. Socket waits
cooperate (gevent patches them), but a call that blocks in the kernel for a
long time, such as ``fdatasync`` of a large file, would stall every other
client of the worker, health checks included. ``run_blocking`` runs such a
call in gevent's thread pool and waits for it cooperatively; outside gevent
(tests, tools) it simply calls it. ``start_blocking`` starts such a call and
lets the caller go on (a fill reads the next piece of a blob while the last
one is hashed and written); outside gevent it runs the call at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def _gevent_active() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def run_blocking(function: Callable[..., T], *args: object) -> T:
    if _gevent_active():
        import gevent

        result: T = gevent.get_hub().threadpool.apply(function, args)
        return result
    return function(*args)


def start_blocking(function: Callable[..., T], *args: object) -> Callable[[], T]:
    """Start ``function(*args)`` off the event loop; calling what this returns waits for its result."""
    if _gevent_active():
        import gevent

        job = gevent.get_hub().threadpool.spawn(function, *args)
        return job.get
    done: Future[T] = Future()
    try:
        done.set_result(function(*args))
    except Exception as exc:
        done.set_exception(exc)
    return done.result
