"""What a benchmark run measures: sizes, concurrency, repetitions.

The defaults are the published run, sized so that the whole benchmark takes
about ten minutes on a 2-core machine; ``QUICK`` is the smoke test the test
suite runs. Every size can be changed on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB

# The scenarios by key, in the order they run and are reported.
SCENARIOS = ("burst", "pull", "throughput", "manifests", "follower", "memory", "clients")


@dataclass(frozen=True)
class Sizes:
    """The generated images, by layer size in bytes."""

    # A small multi-layer image, like a slim base image plus an application.
    small_layers: tuple[int, ...] = (256 * KiB, 1 * MiB, 4 * MiB, 8 * MiB)
    # The 30-layer image: many small requests.
    many_layers: int = 30
    many_layer_size: int = 256 * KiB
    # The image with one large layer (cold and warm pulls, throughput).
    large_layer: int = 256 * MiB
    # Scenario 7: two layer sizes, to show worker memory does not follow them.
    memory_layers: tuple[int, int] = (32 * MiB, 256 * MiB)
    # Scenario 6: the layer a follower joins, and the rate of the throttled
    # upstream it comes through (bytes per second).
    follow_layer: int = 64 * MiB
    follow_rate: int = 32 * MiB
    # Scenario 8: the blob many slow clients download at once.
    clients_layer: int = 64 * MiB


@dataclass(frozen=True)
class Settings:
    sizes: Sizes = Sizes()
    # Repetitions of every measurement; tables show the median and the spread.
    runs: int = 3
    # Scenario 1: how many clients pull at once, and which images.
    burst_clients: tuple[int, ...] = (8, 32)
    burst_images: tuple[str, ...] = ("small",)
    # Blobs a client downloads at once (docker's max-concurrent-downloads).
    client_parallel: int = 3
    # Scenario 3: warm pulls per run; the first and the last are reported.
    warm_repeats: int = 3
    # Scenario 4: concurrent downloads, and how often each downloads the blob.
    throughput_concurrency: tuple[int, ...] = (1, 4)
    throughput_repeats: int = 3
    # Scenario 6 is cheap and its first byte noisy: it gets more rounds.
    follower_runs: int = 5
    # Scenario 5: seconds of load per measurement, and open connections.
    manifest_seconds: int = 2
    manifest_connections: int = 16
    # Scenario 8: how many slow clients at once, each one's rate (bytes per
    # second), and how long each measurement lasts.
    clients_counts: tuple[int, ...] = (100, 1000, 2000)
    clients_rate: int = 128 * KiB
    clients_seconds: float = 10.0
    # Clients check every blob's digest (costs client CPU, so off by default).
    verify: bool = False
    scenarios: tuple[str, ...] = SCENARIOS
    quick: bool = False
    # Where the results go; None leaves that output out.
    markdown: Path | None = Path("docs/benchmarks.md")
    chart: Path | None = Path("docs/benchmarks.png")
    json: Path | None = None
    # The command line that produced the results, for the report.
    command: str = "python -m bench"
    workdir: Path | None = None
    keep: bool = False
    # Record py-spy profiles of node 1's workers while these scenarios run.
    profile: tuple[str, ...] = field(default=())


QUICK = Settings(
    sizes=Sizes(
        small_layers=(16 * KiB, 64 * KiB, 128 * KiB),
        many_layers=10,
        many_layer_size=4 * KiB,
        large_layer=4 * MiB,
        memory_layers=(1 * MiB, 4 * MiB),
        follow_layer=2 * MiB,
        follow_rate=4 * MiB,
        clients_layer=1 * MiB,
    ),
    runs=1,
    follower_runs=1,
    burst_clients=(8,),
    burst_images=("small", "many"),
    warm_repeats=2,
    throughput_concurrency=(1, 2),
    throughput_repeats=2,
    manifest_seconds=1,
    manifest_connections=4,
    clients_counts=(20,),
    clients_rate=64 * KiB,
    clients_seconds=1.0,
    verify=True,
    quick=True,
)
