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

The command line wires ``add_arguments`` and ``run``; ``python -m
shoal.warm`` runs the same without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import httpx

from node.media_types import ACCEPT_MANIFESTS
from node.reference import ALGORITHMS, DIGEST, NAME, TAG

DEFAULT_URL = "http://127.0.0.1:5000"
HELP = "pull images through the cluster so that later pulls are hits"
DESCRIPTION = (
    "Pull every manifest and blob of each IMAGE through the cluster (a node, or the load balancer in front of "
    "the nodes) and drop the bytes, so that the cluster holds the image and the next pull, through any node, "
    "is served without the upstream. IMAGE is name:tag or name@sha256:..., with Docker Hub short names "
    "(alpine:3.19); a registry host in it (ghcr.io/team/app:1.2) is sent as containerd's ?ns= parameter. "
    "Prints a progress bar per image and a summary; exits 1 when any image failed."
)

# A host name or [IPv6 address], and a port: what Docker takes for a registry.
_REGISTRY = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
# Docker Hub's other names; containerd calls it docker.io.
_DOCKER_HUB = {"index.docker.io", "registry-1.docker.io"}
# A manifest bigger than this is not a manifest (distribution refuses 4 MiB).
_MANIFEST_MAX = 4 * 1024 * 1024
_CHUNK = 256 * 1024


class WarmError(Exception):
    """One image could not be warmed; the message says what failed."""


class _Stopped(WarmError):
    """A transfer given up because another one failed, or on Ctrl-C; not a failure of its own."""


@dataclass(frozen=True)
class Reference:
    """An image reference: the registry it names (None: the cluster's default), the name, a tag or digest."""

    text: str
    registry: str | None
    name: str
    reference: str

    @property
    def params(self) -> dict[str, str]:
        """Query parameters of every request for this image: containerd's ``ns``."""
        return {"ns": self.registry} if self.registry else {}


def parse_reference(text: str) -> Reference:
    """Parse ``[registry/]name[:tag][@digest]``; a missing tag is ``latest``, a digest wins over a tag."""
    rest, _, digest = text.strip().partition("@")
    tag = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    registry = None
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, remainder
        if not _REGISTRY.fullmatch(registry):
            raise WarmError(f"{text!r}: invalid registry {registry!r}")
        if registry in _DOCKER_HUB:
            registry = "docker.io"
    if not rest or not NAME.fullmatch(rest):
        raise WarmError(f"{text!r} is not an image reference (name:tag or name@sha256:...)")
    if tag is not None and not TAG.fullmatch(tag):
        raise WarmError(f"{text!r}: invalid tag {tag!r}")
    if digest and not DIGEST.fullmatch(digest):
        raise WarmError(f"{text!r}: invalid digest {digest!r}")
    return Reference(text=text, registry=registry, name=rest, reference=digest or tag or "latest")


def _platform(value: str) -> str:
    if not _PLATFORM.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected OS/ARCH or OS/ARCH/VARIANT, such as linux/arm64, not {value!r}")
    return value


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {value!r}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {value!r}")
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


# What to fetch.


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    is_layer: bool


@dataclass
class Plan:
    """Everything one image consists of: its manifests (already fetched) and the blobs to fetch."""

    manifests: int = 0
    blobs: dict[str, Blob] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return sum(1 for blob in self.blobs.values() if blob.is_layer)

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs.values())


def _describe_error(response: httpx.Response) -> str:
    """``404 MANIFEST_UNKNOWN: manifest unknown`` from an OCI error body, else the status."""
    text = f"{response.status_code} {response.reason_phrase}".strip()
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return f"{response.status_code} {first.get('code', '')}: {first.get('message', '')}".strip()
    except (ValueError, AttributeError, IndexError, TypeError):
        return text


def _platform_of(descriptor: dict[str, Any]) -> str | None:
    platform = descriptor.get("platform")
    if not isinstance(platform, dict) or not platform.get("os") or not platform.get("architecture"):
        return None
    parts = [str(platform["os"]), str(platform["architecture"])]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _matches(platform: str | None, wanted: list[str]) -> bool:
    """An index entry for os/arch/variant matches os/arch/variant exactly, and os/arch."""
    if platform is None:
        return False
    for want in wanted:
        if platform == want or (want.count("/") == 1 and platform.split("/")[:2] == want.split("/")):
            return True
    return False


def _check_digest(digest: str, data: bytes) -> None:
    """Check a manifest asked for by a digest of a verifiable algorithm (others pass unchecked)."""
    algorithm, _, expected = digest.partition(":")
    if algorithm in ALGORITHMS and hashlib.new(algorithm, data).hexdigest() != expected:
        raise WarmError(f"manifest {digest}: the bytes do not match the digest")


class Warmer:
    """Warms images through one cluster URL: ``plan`` then ``fetch``, for one image after another."""

    def __init__(
        self,
        http: httpx.Client,
        pool: ThreadPoolExecutor,
        concurrency: int,
        platforms: list[str] | None = None,
    ) -> None:
        self.http = http
        self.pool = pool
        self.concurrency = concurrency
        self.platforms = platforms or []
        self.stop = threading.Event()
        # Blobs warmed earlier in this run; another image sharing them skips them.
        self._warm: set[str] = set()

    def plan(self, ref: Reference) -> Plan:
        """Fetch the manifest, and the children of an index, and list the blobs."""
        plan = Plan()
        media_type, document = self._manifest(ref, ref.reference)
        plan.manifests += 1
        if "manifests" in document:
            self._plan_index(ref, document, plan, depth=0)
        else:
            self._plan_image(document, media_type, plan)
        return plan

    def _plan_index(self, ref: Reference, index: dict[str, Any], plan: Plan, depth: int) -> None:
        children = [entry for entry in index.get("manifests") or [] if isinstance(entry, dict)]
        if self.platforms:
            offered = sorted({platform for entry in children if (platform := _platform_of(entry))})
            children = [entry for entry in children if _matches(_platform_of(entry), self.platforms)]
            if not children and depth == 0:
                raise WarmError(
                    f"no manifest for {', '.join(self.platforms)} (the image has {', '.join(offered) or 'none'})"
                )
        for entry in children:
            digest = str(entry.get("digest", ""))
            if not DIGEST.fullmatch(digest):
                raise WarmError(f"the index lists an invalid digest {digest!r}")
            media_type, document = self._manifest(ref, digest)
            plan.manifests += 1
            if "manifests" in document:
                # An index in an index is rare; deeper than two levels is a loop or a mistake.
                if depth < 2:
                    self._plan_index(ref, document, plan, depth + 1)
                continue
            platform = _platform_of(entry)
            if platform:
                plan.platforms.append(platform)
            self._plan_image(document, media_type, plan)

    @staticmethod
    def _plan_image(document: dict[str, Any], media_type: str, plan: Plan) -> None:
        if "layers" not in document and "config" not in document:
            raise WarmError(f"unsupported manifest type {media_type or 'without a media type'}")
        descriptors = [(document.get("config"), False)] + [(layer, True) for layer in document.get("layers") or []]
        for descriptor, is_layer in descriptors:
            if not isinstance(descriptor, dict) or not descriptor.get("digest"):
                continue
            # Foreign (non-distributable) layers live at their own URLs, not in any registry.
            if descriptor.get("urls") and "foreign" in str(descriptor.get("mediaType", "")):
                continue
            digest = str(descriptor["digest"])
            if not DIGEST.fullmatch(digest):
                raise WarmError(f"the manifest lists an invalid digest {digest!r}")
            size = descriptor.get("size")
            plan.blobs.setdefault(digest, Blob(digest, int(size) if isinstance(size, int) else 0, is_layer))

    def _manifest(self, ref: Reference, reference: str) -> tuple[str, dict[str, Any]]:
        url = f"/v2/{ref.name}/manifests/{reference}"
        try:
            response = self.http.get(url, params=ref.params, headers={"Accept": ACCEPT_MANIFESTS})
        except httpx.HTTPError as exc:
            raise WarmError(f"manifest {reference}: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise WarmError(f"manifest {reference}: {_describe_error(response)}")
        if len(response.content) > _MANIFEST_MAX:
            raise WarmError(f"manifest {reference}: larger than {_MANIFEST_MAX} bytes")
        if DIGEST.fullmatch(reference):
            _check_digest(reference, response.content)
        try:
            document = json.loads(response.content)
        except ValueError:
            raise WarmError(f"manifest {reference}: not JSON") from None
        if not isinstance(document, dict):
            raise WarmError(f"manifest {reference}: not a JSON object")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip() or str(
            document.get("mediaType", "")
        )
        return media_type, document

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
                    if error is not None and not isinstance(error, _Stopped):
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
        # The plan holds only digests that match the grammar: one colon.
        algorithm, _, expected = blob.digest.partition(":")
        hasher = hashlib.new(algorithm) if algorithm in ALGORITHMS else None
        received = 0
        try:
            with self.http.stream("GET", f"/v2/{ref.name}/blobs/{blob.digest}", params=ref.params) as response:
                if response.status_code != 200:
                    response.read()
                    raise WarmError(f"blob {blob.digest}: {_describe_error(response)}")
                for chunk in response.iter_bytes(_CHUNK):
                    if self.stop.is_set():
                        raise _Stopped(f"blob {blob.digest}: stopped")
                    if hasher is not None:
                        hasher.update(chunk)
                    received += len(chunk)
                    progress.advance(len(chunk))
        except httpx.HTTPError as exc:
            raise WarmError(f"blob {blob.digest}: {exc or type(exc).__name__} after {received} bytes") from None
        if blob.size and received != blob.size:
            raise WarmError(f"blob {blob.digest}: got {received} bytes, the manifest says {blob.size}")
        if hasher is not None and hasher.hexdigest() != expected:
            raise WarmError(f"blob {blob.digest}: the bytes do not match the digest")
        self._warm.add(blob.digest)
        progress.blob_done(blob)


# Showing it.


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("not reached")


class Progress(Protocol):
    """What happens to one image, as it happens; ``advance`` and ``blob_done`` come from several threads."""

    def planned(self, plan: Plan) -> None: ...

    def advance(self, count: int) -> None: ...

    def blob_done(self, blob: Blob) -> None: ...

    def finished(self, error: str | None) -> None: ...


class _Counts:
    def __init__(self, label: str, clock: Callable[[], float]) -> None:
        self.label = label
        self.clock = clock
        self.started = clock()
        self.lock = threading.Lock()
        self.total_bytes = 0
        self.total_layers = 0
        self.bytes = 0
        self.layers = 0

    def plan(self, plan: Plan) -> None:
        self.total_bytes, self.total_layers = plan.size, plan.layers

    def elapsed(self) -> float:
        return self.clock() - self.started


class BarProgress:
    """One line per image on a terminal, redrawn in place: a bar, bytes and layers.

    The line never wraps, which would break the redrawing: on a narrow
    terminal the image's name is shortened from the left first.
    """

    BAR = 24

    def __init__(
        self,
        label: str,
        out: TextIO,
        clock: Callable[[], float] = time.monotonic,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self.counts = _Counts(label, clock)
        self.out = out
        self.columns = columns or self._terminal_columns
        self._last_draw = 0.0
        self._draw(force=True)

    def _terminal_columns(self) -> int:
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def planned(self, plan: Plan) -> None:
        with self.counts.lock:
            self.counts.plan(plan)
            self._draw(force=True)

    def advance(self, count: int) -> None:
        with self.counts.lock:
            self.counts.bytes += count
            self._draw()

    def blob_done(self, blob: Blob) -> None:
        with self.counts.lock:
            self.counts.layers += blob.is_layer
            self._draw(force=True)

    def finished(self, error: str | None) -> None:
        with self.counts.lock:
            counts = self.counts
            tail = f"done in {counts.elapsed():.1f}s" if error is None else f"FAILED: {error}"
            self._draw(force=True, tail=tail)
            self.out.write("\n")
            self.out.flush()

    def line(self, width: int, tail: str = "") -> str:
        """The line as drawn, at most ``width`` characters."""
        counts = self.counts
        if counts.total_bytes:
            share = min(1.0, counts.bytes / counts.total_bytes)
            filled = round(share * self.BAR)
            bar = f"[{'#' * filled}{'.' * (self.BAR - filled)}] {share * 100:3.0f}%"
            size = f"{human_bytes(counts.bytes)} / {human_bytes(counts.total_bytes)}"
            status = f"{bar}  {size}  {counts.layers}/{counts.total_layers} layers"
        else:
            status = "resolving..."
        if tail:
            status = f"{status}  {tail}"
        room = width - len(status) - 2
        label = counts.label
        if len(label) > room:
            label = "..." + label[-(room - 3) :] if room > 12 else label[: max(room, 12)]
        return f"{label}  {status}"[:width]

    def _draw(self, force: bool = False, tail: str = "") -> None:
        now = self.counts.clock()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        # One column short of the edge: a full line would move the cursor on some terminals.
        self.out.write("\r\x1b[K" + self.line(max(20, self.columns() - 1), tail))
        self.out.flush()


class LineProgress:
    """Plain lines for logs (stdout is not a terminal): the plan, each finished layer, the end."""

    def __init__(self, label: str, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts = _Counts(label, clock)
        self.out = out

    def _print(self, text: str) -> None:
        self.out.write(f"{self.counts.label}: {text}\n")
        self.out.flush()

    def planned(self, plan: Plan) -> None:
        with self.counts.lock:
            self.counts.plan(plan)
            platforms = f" for {', '.join(plan.platforms)}" if plan.platforms else ""
            self._print(
                f"{plural(plan.layers, 'layer')}, {human_bytes(plan.size)} in {plural(len(plan.blobs), 'blob')}, "
                f"{plural(plan.manifests, 'manifest')}{platforms}"
            )

    def advance(self, count: int) -> None:
        with self.counts.lock:
            self.counts.bytes += count

    def blob_done(self, blob: Blob) -> None:
        with self.counts.lock:
            counts = self.counts
            if blob.is_layer:
                counts.layers += 1
                what = f"layer {counts.layers}/{counts.total_layers}"
            else:
                what = "config"
            self._print(
                f"{what} {blob.digest[:19]} {human_bytes(blob.size)} "
                f"({human_bytes(counts.bytes)} / {human_bytes(counts.total_bytes)})"
            )

    def finished(self, error: str | None) -> None:
        with self.counts.lock:
            counts = self.counts
            if error is None:
                self._print(f"done, {human_bytes(counts.bytes)} in {counts.elapsed():.1f}s")
            else:
                self._print(f"FAILED: {error}")


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


def _reachable(http: httpx.Client) -> str | None:
    """None when the URL answers the registry API's base endpoint, else why not."""
    try:
        response = http.get("/v2/")
    except httpx.HTTPError as exc:
        return str(exc) or type(exc).__name__
    if response.status_code not in (200, 401):
        return f"GET /v2/ answered {_describe_error(response)}"
    return None


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
        problem = _reachable(http)
        if problem is not None:
            err.write(f"shoal warm: cannot reach a registry at {url}: {problem}\n")
            return 1
        warmer = Warmer(http, pool, args.concurrency, args.platform)
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
