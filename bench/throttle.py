"""A rate-limited TCP forwarder: a slower link in front of the upstream.

The benchmark's upstream is local and fast, so a layer arrives before a
second client could ask for it. Scenario 6 puts this forwarder between the
nodes and the upstream: bytes from the upstream are paced to ``--rate``
bytes per second on each connection, requests pass unchanged.

Run as ``python -m bench.throttle --port P --target HOST:PORT --rate N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from testbed.processes import Process, free_port, wait_for_port

# A connection that was idle may send this many seconds' worth of bytes at
# once, no more: a keep-alive connection must not save up for a burst.
BURST = 0.05


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
    loop = asyncio.get_running_loop()
    # Small reads keep the pace smooth: about a hundred per second at the rate.
    size = 65536 if rate is None else max(4096, min(65536, int(rate / 100)))
    # When the bytes sent so far may all have left, at the rate.
    paced_until = loop.time()
    try:
        while data := await reader.read(size):
            if rate is not None:
                paced_until = max(paced_until, loop.time() - BURST) + len(data) / rate
                delay = paced_until - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(port: int, target: tuple[str, int], rate: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, upstream_writer, None),
            _pipe(upstream_reader, client_writer, rate),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throttle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--target", required=True, metavar="HOST:PORT", help="where to forward")
    parser.add_argument("--rate", type=float, required=True, help="bytes per second from the target, per connection")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    asyncio.run(serve(args.port, (host, int(port)), args.rate))
    return 0


class Throttle:
    """The forwarder as a child process, in front of ``target_url``."""

    def __init__(self, workdir: Path, target_url: str, rate: int) -> None:
        self.port = free_port()
        self.process = Process(
            [
                sys.executable,
                "-m",
                "bench.throttle",
                "--port",
                str(self.port),
                "--target",
                target_url.split("://", 1)[1],
                "--rate",
                str(rate),
            ],
            workdir / "throttle.log",
            # Where ``bench`` is importable from, wherever the harness was started.
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            wait_for_port(self.port, self.process, "the throttling forwarder")
        except BaseException:
            self.process.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.process.stop()


if __name__ == "__main__":
    sys.exit(main())
