"""``shoal warm IMAGE...``: pull images through the cluster so that later pulls are hits.

For each image reference it asks the cluster (any node, or the load balancer
in front of them) for the manifest with every manifest type in ``Accept``;
for an index or manifest list it fetches each child manifest (those of the
``--platform`` asked for, else all), then every blob (configs and layers),
a few at a time, reading each to its end and dropping the bytes. The
cluster does what it does for any pull: a miss is fetched from the upstream
once and stored, so the next pull of the image, through any node, never
touches the upstream.

Bytes are checked against their digests as they pass, so a warm that
reports success has seen every byte the cluster will serve. A reference
that names a registry (``ghcr.io/team/app:1.2``) is asked for with
containerd's ``ns`` query parameter (``?ns=ghcr.io``), which the cluster
uses to pick the upstream; a short name (``alpine:3.19``) goes to the
cluster's default upstream, which adds Docker Hub's ``library/`` itself.

This module is the command and its runner (``Warmer``: plan, then fetch a
few blobs at a time); the image's reference and plan are
``shoal.warm_plan``'s, the requests ``shoal.warm_client``'s and the display
``shoal.warm_progress``'s. The command line wires ``add_arguments`` and
``run``; ``python -m shoal.warm`` runs the same without it.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TextIO, TypeVar

import httpx

from shoal.errors import Stopped, WarmError
from shoal.warm_client import RegistryClient
from shoal.warm_plan import Blob, Plan, Planner, Reference, parse_reference
from shoal.warm_progress import BarProgress, LineProgress, Progress, human_bytes, plural

DEFAULT_URL = "http://127.0.0.1:5000"
HELP = "pull images through the cluster so that later pulls are hits"
DESCRIPTION = (
    "Pull every manifest and blob of each IMAGE through the cluster (a node, or the load balancer in front of "
    "the nodes) and drop the bytes, so that the cluster holds the image and the next pull, through any node, "
    "is served without the upstream. IMAGE is name:tag or name@sha256:..., with Docker Hub short names "
    "(alpine:3.19); a registry host in it (ghcr.io/team/app:1.2) is sent as containerd's ?ns= parameter. "
    "Prints a progress bar per image and a summary; exits 1 when any image failed."
)

_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
_Number = TypeVar("_Number", int, float)


def _platform(value: str) -> str:
    if not _PLATFORM.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected OS/ARCH or OS/ARCH/VARIANT, such as linux/arm64, not {value!r}")
    return value


def _positive(value: str) -> int:
    return _above_zero(int, value, "a positive whole number", "a positive whole number")


def _seconds(value: str) -> float:
    return _above_zero(float, value, "a number of seconds", "a number of seconds above 0")


def _above_zero(kind: Callable[[str], _Number], value: str, expected: str, expected_above_zero: str) -> _Number:
    """``value`` read as ``kind`` and above 0; the usage error says which of the two it is not."""
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, not {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected {expected_above_zero}, not {value!r}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``shoal warm``."""
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="name:tag or name@sha256:..., e.g. alpine:3.19, library/redis@sha256:..., ghcr.io/team/app:1.2",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="a node of the cluster, or the load balancer in front of the nodes (default %(default)s)",
    )
    parser.add_argument(
        "--platform",
        action="append",
        type=_platform,
        metavar="OS/ARCH[/VARIANT]",
        help="of a multi-platform image, warm only this platform; repeat it for several (default: every platform)",
    )
    parser.add_argument(
        "-j",
        "--concurrency",
        type=_positive,
        default=4,
        metavar="N",
        help="blobs downloaded at once (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="give up on a request that sends nothing for this long (default %(default)g)",
    )


class Warmer:
    """Warms images through one cluster URL: ``plan`` then ``fetch``, for one image after another."""

    def __init__(
        self,
        client: RegistryClient,
        pool: ThreadPoolExecutor,
        concurrency: int,
        platforms: Sequence[str] | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self.concurrency = concurrency
        self.planner = Planner(client, platforms)
        self.stop = threading.Event()
        # Blobs warmed earlier in this run; another image sharing them skips them.
        self._warm: set[str] = set()

    def plan(self, ref: Reference) -> Plan:
        """Fetch the manifest, and the children of an index, and list the blobs."""
        return self.planner.plan(ref)

    def fetch(self, ref: Reference, plan: Plan, progress: Progress) -> None:
        """Download every blob of ``plan``, ``concurrency`` at a time; raise WarmError naming the first failure."""
        pending = [blob for blob in plan.blobs.values() if blob.digest not in self._warm]
        for blob in plan.blobs.values():
            if blob.digest in self._warm:
                progress.advance(blob.size)
                progress.blob_done(blob)
        failures: list[str] = []
        running: set[Future[None]] = set()
        queue = iter(pending)
        try:
            while True:
                while len(running) < self.concurrency and not failures:
                    item = next(queue, None)
                    if item is None:
                        break
                    running.add(self.pool.submit(self._blob, ref, item, progress))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    if error is not None and not isinstance(error, Stopped):
                        failures.append(str(error))
                if failures:
                    # The image has failed: the transfers in flight stop at their next chunk.
                    self.stop.set()
        finally:
            # Also reached on Ctrl-C, with transfers in flight.
            self.stop.set()
            wait(running)
            self.stop.clear()
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise WarmError(failures[0] + more)

    def _blob(self, ref: Reference, blob: Blob, progress: Progress) -> None:
        self.client.download(ref, blob, progress, self.stop)
        self._warm.add(blob.digest)
        progress.blob_done(blob)


@dataclass
class Result:
    text: str
    error: str | None = None
    size: int = 0
    layers: int = 0
    seconds: float = 0.0


def summary(results: list[Result], url: str, seconds: float) -> str:
    warmed = [result for result in results if result.error is None]
    total = sum(result.size for result in warmed)
    lines = [f"Warmed {len(warmed)} of {len(results)} images through {url}: {human_bytes(total)} in {seconds:.1f}s"]
    width = max(len(result.text) for result in results)
    for result in results:
        if result.error is None:
            details = f"{plural(result.layers, 'layer')}  {human_bytes(result.size)}  {result.seconds:.1f}s"
            lines.append(f"  ok      {result.text:<{width}}  {details}")
        else:
            lines.append(f"  FAILED  {result.text:<{width}}  {result.error}")
    return "\n".join(lines)


def _warm_one(warmer: Warmer, text: str, progress: Progress, clock: Callable[[], float]) -> Result:
    started = clock()
    result = Result(text)
    try:
        ref = parse_reference(text)
        plan = warmer.plan(ref)
        progress.planned(plan)
        warmer.fetch(ref, plan, progress)
        result.size, result.layers = plan.size, plan.layers
    except WarmError as exc:
        result.error = str(exc)
    result.seconds = clock() - started
    progress.finished(result.error)
    return result


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Warm ``args.images`` through ``args.url``; 0 when every image is warm, 1 otherwise."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    clock = time.monotonic
    url = args.url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0))
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    started = clock()
    results: list[Result] = []
    headers = {"User-Agent": "shoal-warm"}
    with (
        httpx.Client(base_url=url, timeout=timeout, limits=limits, headers=headers, follow_redirects=True) as http,
        ThreadPoolExecutor(args.concurrency, thread_name_prefix="shoal-warm") as pool,
    ):
        client = RegistryClient(http)
        problem = client.reachable()
        if problem is not None:
            err.write(f"shoal warm: cannot reach a registry at {url}: {problem}\n")
            return 1
        warmer = Warmer(client, pool, args.concurrency, args.platform)
        bar = out.isatty()
        try:
            for text in args.images:
                progress: Progress = BarProgress(text, out) if bar else LineProgress(text, out)
                result = _warm_one(warmer, text, progress, clock)
                if result.error is not None:
                    err.write(f"shoal warm: {text}: {result.error}\n")
                    err.flush()
                results.append(result)
        except KeyboardInterrupt:
            warmer.stop.set()
            out.write("\n")
            err.write("shoal warm: interrupted\n")
            return 130
    out.write(summary(results, url, clock() - started) + "\n")
    out.flush()
    return 0 if all(result.error is None for result in results) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal warm", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
