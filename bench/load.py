"""Load from compiled clients, so that the client is not what is measured.

``curl`` downloads large blobs (scenario 4); ``wrk`` sends manifest requests
as fast as the server answers (scenario 5). A Python client would spend a
core of this 2-core machine on itself and flatten every ratio.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

from node.media_types import ACCEPT_MANIFESTS
from testbed.processes import require_binary


def curl_throughput(url: str, concurrency: int, repeats: int, size: int) -> float:
    """Bytes per second of ``concurrency`` curls each downloading ``url`` ``repeats`` times."""
    curl = require_binary("curl", "curl")
    command = [curl, "--silent", "--show-error", "--fail", "--write-out", "%{size_download}\\n"]
    for _ in range(repeats):
        command += ["--output", "/dev/null", url]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(concurrency)
    ]
    received = 0
    try:
        for process in processes:
            out, err = process.communicate(timeout=600)
            if process.returncode != 0:
                raise RuntimeError(f"curl {url} failed ({process.returncode}): {err.decode(errors='replace')}")
            received += sum(int(line) for line in out.split())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    elapsed = time.perf_counter() - started
    if received != size * concurrency * repeats:
        raise RuntimeError(f"curl received {received} bytes from {url}, expected {size * concurrency * repeats}")
    return received / elapsed


@dataclass(frozen=True)
class Rate:
    requests_per_second: float
    requests: int
    # wrk's 99th percentile of the latency, in seconds.
    p99: float


_REQUESTS = re.compile(r"(\d+) requests in")
_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_P99 = re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_FAILURES = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)")


def wrk_rate(url: str, seconds: int, connections: int) -> Rate:
    """Requests per second of GET ``url`` with a registry client's Accept header, by wrk."""
    wrk = require_binary("wrk", "wrk")
    command = [
        wrk,
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "--header",
        f"Accept: {ACCEPT_MANIFESTS}",
        url,
    ]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=seconds + 60, check=False)
    out = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"wrk {url} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    failures = _FAILURES.search(out)
    if failures:
        raise RuntimeError(f"wrk {url}: some requests failed:\n{out}")
    rate, requests, p99 = _RATE.search(out), _REQUESTS.search(out), _P99.search(out)
    if rate is None or requests is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return Rate(float(rate.group(1)), int(requests.group(1)), float(p99.group(1)) * _UNIT[p99.group(2)])
