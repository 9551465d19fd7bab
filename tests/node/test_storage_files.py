"""Locks between workers leave no files behind; fill slots are one cap for the node; stale files go."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from node.errors import Busy
from node.reference import digest_of
from node.storage.files import LockTimeout, exclusive, held, try_lock, unlock
from node.storage.fill import Fills
from node.storage.layout import Layout
from node.storage.local import LocalStore
from node.storage.slots import Slots
from node.storage.stale import STALE_AGE, remove_stale
from tests.node.test_storage_fill import Source


def test_a_lock_file_is_removed_when_its_holder_lets_go(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    with exclusive(path, timeout=1):
        assert held(path)
    assert not os.path.exists(path)
    fd = try_lock(path)
    assert fd is not None
    unlock(fd, path)
    assert not os.path.exists(path) and not held(path)
    # Asking whether a lock is held creates nothing.
    assert not os.path.exists(path)


def test_a_taker_that_raced_the_holders_removal_does_not_hold_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "x.lock")
    holder = try_lock(path)
    assert holder is not None
    real_open = os.open
    taken: list[int] = []
    raced = threading.Event()

    def racing_open(opened: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(opened, flags, mode)
        if opened == path and not raced.is_set():
            raced.set()
            # Right after this taker opened the file: its holder removes it
            # and lets go, and another taker makes the file anew and takes it.
            unlock(holder, path)
            other = try_lock(path)
            assert other is not None
            taken.append(other)
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    try:
        # This taker's flock succeeds on the removed file: it must not count.
        assert try_lock(path) is None
    finally:
        monkeypatch.undo()
        unlock(taken[0], path)


def test_a_lock_wait_has_a_deadline_with_a_clear_503(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    holder = try_lock(path)
    assert holder is not None
    try:
        with pytest.raises(LockTimeout) as raised, exclusive(path, timeout=0.05):
            pass
        assert raised.value.status == 503 and raised.value.retry_after == 1
        assert raised.value.code == "UPSTREAM_UNAVAILABLE"
    finally:
        unlock(holder, path)


def test_fill_slots_cap_the_node_whichever_workers_fill(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), 1 << 30)
    # Two workers of one node: two Fills over one store, one slot between them.
    first, second = Fills(store, timeout=0.2, max_fills=1), Fills(store, timeout=0.2, max_fills=1)
    running = Source()
    running.gate = threading.Event()
    other = os.urandom(1000)
    try:
        following = first.join(running, "app", digest_of(running.data))
        assert following is not None
        assert first.slots.in_use() == 1 and first.reserved() == len(running.data)
        with pytest.raises(Busy):
            second.join(Source(other), "app", digest_of(other))
        with pytest.raises(Busy):
            second.join(Source(other), "app", digest_of(other), wait=False)
        following.close()
    finally:
        running.gate.set()
        first.close()
        second.close()
    assert first.slots.in_use() == 0 and first.reserved() == 0
    following = second.join(Source(other), "app", digest_of(other))
    assert following is not None
    following.close()
    second.close()


def test_a_slot_of_a_dead_holder_is_free() -> None:
    slots = Slots(["/nonexistent/never-used"])
    assert slots.in_use() == 0 and slots.reserved() == 0


def _age(path: Path, seconds: float) -> None:
    old = os.stat(path).st_mtime - seconds
    os.utime(path, (old, old))


def test_the_sweep_removes_stale_files_and_keeps_live_ones(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), 1 << 30)
    layout = store.layout
    fills = Path(layout.fills)
    dead = digest_of(b"dead")
    live = digest_of(b"live")
    (fills / os.path.basename(layout.fill_partial(dead, "00ff"))).write_bytes(b"half")
    (fills / os.path.basename(layout.fill_state(dead))).write_bytes(b"{}")
    (fills / os.path.basename(layout.fill_lock(dead))).write_bytes(b"")
    (fills / "tag-0123.lock").write_bytes(b"")
    old_put, new_put = fills / "ab.cd.put", fills / "ef.gh.put"
    old_tmp = Path(layout.repos) / "r" / "_tags" / ".x.tmp"
    old_tmp.parent.mkdir(parents=True)
    for path in (old_put, new_put, old_tmp):
        path.write_bytes(b"x")
    _age(old_put, STALE_AGE + 1)
    _age(old_tmp, STALE_AGE + 1)
    # A fill that runs now: its lock is held, so its files stay.
    live_lock = try_lock(layout.fill_lock(live))
    assert live_lock is not None
    live_partial = Path(layout.fill_partial(live, "11ee"))
    live_partial.write_bytes(b"growing")
    try:
        store.sweep()
        left = sorted(os.listdir(fills))
        assert left == sorted([live_partial.name, os.path.basename(layout.fill_lock(live)), new_put.name])
        assert not old_tmp.exists()
    finally:
        unlock(live_lock, layout.fill_lock(live))
    # At start nothing writes: every .put and .tmp goes, whatever its age.
    assert remove_stale(Layout(str(tmp_path)), older_than=0) == 2
    assert os.listdir(fills) == []
    store.close()
