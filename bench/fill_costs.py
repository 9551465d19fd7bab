"""What one cold fill costs, step by step: ``python -m bench.fill_costs``.

A node's cold fill reads the blob from the upstream, hashes it, writes it
to a partial file and syncs it before the rename. This measures each step
alone, in this process, against a local upstream: reading the body with
httpx (as ``node/upstream.py`` does) and with ``http.client.readinto`` into
a reusable buffer, then adding the hash, the write and ``fdatasync``. It
starts its own ``docker-registry`` and removes everything afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.publisher import Publisher
from bench.settings import MiB
from node.config import parse_size
from testbed.registry import DistributionRegistry


class _Sink:
    """Where the bytes go: optionally a hash, optionally a file, optionally synced."""

    def __init__(self, path: Path, hash_it: bool, write: bool, sync: bool) -> None:
        self.hasher = hashlib.sha256() if hash_it else None
        self.fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644) if write else None
        self.sync = sync

    def take(self, chunk: bytes | memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(chunk)
        if self.fd is not None:
            os.write(self.fd, chunk)

    def close(self) -> None:
        if self.fd is not None:
            if self.sync:
                os.fdatasync(self.fd)
            os.close(self.fd)


def _with_httpx(url: str, sink: _Sink) -> None:
    with httpx.Client() as client, client.stream("GET", url) as response:
        for chunk in response.iter_bytes():
            sink.take(chunk)
    sink.close()


def _with_readinto(host: str, port: int, path: str, sink: _Sink) -> None:
    connection = http.client.HTTPConnection(host, port)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        buffer = bytearray(MiB)
        view = memoryview(buffer)
        while count := response.readinto(buffer):
            sink.take(view[:count])
    finally:
        connection.close()
    sink.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fill_costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 * MiB, help="blob size (default 256MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per step (default 5)")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="shoal-fill-costs-") as scratch,
        DistributionRegistry(Path(scratch) / "upstream") as upstream,
    ):
        publisher = Publisher(upstream.url)
        image = publisher.publish("costs/blob", (args.size,), "costs")
        publisher.close()
        digest, _ = image.largest_blob
        path = f"/v2/{image.repository}/blobs/{digest}"
        out = Path(scratch) / "partial"
        steps: list[tuple[str, Callable[[_Sink], None]]] = [
            ("httpx", lambda sink: _with_httpx(upstream.url + path, sink)),
            ("readinto", lambda sink: _with_readinto("127.0.0.1", upstream.port, path, sink)),
        ]
        print(f"one {args.size / MiB:.0f} MiB blob from a local docker-registry, median of {args.repeats}:")
        for reader, read in steps:
            for label, flags in (
                ("read", (False, False, False)),
                ("read + sha256", (True, False, False)),
                ("read + sha256 + write", (True, True, False)),
                ("read + sha256 + write + fdatasync", (True, True, True)),
            ):
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    read(_Sink(out, *flags))
                    times.append(time.perf_counter() - started)
                print(f"  {reader:9} {label:36} {statistics.median(times):6.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
