"""Many clients downloading one blob at a limited rate each, from one process.

Each client opens its own connection, sends one GET and reads the body at
``--rate`` bytes per second (its receive buffer is kept small, so the server
feels the pace as it would a slow link). After ``--seconds`` every client
stops and the process prints, as JSON, what each one got: its status line,
bytes, the time of its first byte, and the bytes it read in the last
``WINDOW`` seconds (to tell which downloads were still progressing).

Run as ``python -m bench.slow_clients --url URL --path PATH --clients N
--rate BYTES --seconds S``; the load is on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

# A client's receive buffer: small, so that the pace reaches the server.
RCVBUF = 64 * 1024
# Read this often; each read takes up to rate * TICK bytes.
TICK = 0.1
# The last seconds of the run, over which "progressing" is judged.
WINDOW = 2.0
# Clients connect at most this many at a time, as a fleet ramps up.
CONNECT_BATCH = 200


@dataclass
class Client:
    status: str = ""
    received: int = 0
    first_byte: float | None = None
    recent: int = 0
    error: str = ""


async def _one(host: str, port: int, path: str, rate: float, until: float, window_from: float, into: Client) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    started = loop.time()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), max(0.1, until - loop.time()))
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        await loop.sock_sendall(sock, request)
        budget = 0.0
        while loop.time() < until:
            budget = min(budget + rate * TICK, rate * TICK * 4)
            deadline = loop.time() + TICK
            while budget >= 1 and loop.time() < deadline:
                try:
                    data = await asyncio.wait_for(
                        loop.sock_recv(sock, int(min(budget, 1 << 16))), max(0.001, deadline - loop.time())
                    )
                except TimeoutError:
                    break
                if not data:
                    return
                if into.first_byte is None:
                    into.first_byte = loop.time() - started
                    into.status = data.split(b"\r\n", 1)[0].decode("latin-1")[:40]
                into.received += len(data)
                if loop.time() >= window_from:
                    into.recent += len(data)
                budget -= len(data)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
    except (OSError, TimeoutError) as exc:
        into.error = type(exc).__name__
    finally:
        sock.close()


async def _run(url: str, path: str, count: int, rate: float, seconds: float) -> list[Client]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    window_from = until - WINDOW
    clients = [Client() for _ in range(count)]
    tasks = []
    for start in range(0, count, CONNECT_BATCH):
        for client in clients[start : start + CONNECT_BATCH]:
            tasks.append(asyncio.create_task(_one(host, port, path, rate, until, window_from, client)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    return clients


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="bytes per second per client")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.clients + 256)), hard))
    started = time.monotonic()
    clients = asyncio.run(_run(args.url, args.path, args.clients, args.rate, args.seconds))
    json.dump(
        {"seconds": time.monotonic() - started, "window": WINDOW, "clients": [asdict(c) for c in clients]},
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
