"""Blocking system calls kept off a gevent worker's event loop.

Under gevent every client of a worker shares one thread. Socket waits
cooperate (gevent patches them), but a call that blocks in the kernel for a
long time, such as ``fdatasync`` of a large file, would stall every other
client of the worker, health checks included. ``run_blocking`` runs such a
call in gevent's thread pool and waits for it cooperatively; outside gevent
(tests, tools) it simply calls it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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
