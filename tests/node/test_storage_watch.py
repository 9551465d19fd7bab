"""Followers wake when their partial file changes (node/storage/watch.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from node.storage.watch import PartialWatch


def test_a_write_from_another_descriptor_wakes_every_watcher(tmp_path: Path) -> None:
    path = tmp_path / "blob.partial"
    path.write_bytes(b"")
    watch = PartialWatch()
    try:
        with watch.watching(str(path)) as first, watch.watching(str(path)) as second:
            # Followers of one fill share one watch.
            assert first is second
            seen = first.generation
            woken = threading.Event()

            def follower() -> None:
                first.wait(seen, timeout=30)
                woken.set()

            thread = threading.Thread(target=follower)
            thread.start()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"bytes")
            os.close(fd)
            assert woken.wait(10), "the write did not wake the follower"
            thread.join()
            assert first.generation != seen
            # Making the file read-only (the verified mark) wakes them too.
            seen = first.generation
            os.chmod(path, 0o444)
            first.wait(seen, timeout=10)
            assert first.generation != seen
    finally:
        watch.close()


def test_a_missing_file_gives_a_change_that_only_times_out(tmp_path: Path) -> None:
    watch = PartialWatch()
    try:
        with watch.watching(str(tmp_path / "gone.partial")) as change:
            change.wait(change.generation, timeout=30)
            assert change.generation == 0
    finally:
        watch.close()
