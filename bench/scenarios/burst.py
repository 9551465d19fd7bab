"""Scenario 1: C clients pull the same image at once, cold."""

from __future__ import annotations

from bench.client import burst
from bench.publisher import layer_sizes
from bench.results import Ratio, Section, Table, Target
from bench.scenarios import human_size, rotate, say, show
from bench.settings import Settings
from bench.stack import SYSTEMS, Stack
from bench.stats import percentile, ratios

MEASURED = ("shoal", "dist1", "dist3", "upstream")
# Each gets a copy of the image; the upstream's is the reference of a pull straight from it.
ANCHORS = ("dist1", "dist3", "upstream")


def run(stack: Stack, settings: Settings) -> Section:
    # raw[image][clients][system] = one record per run
    raw: dict[str, dict[int, dict[str, list[dict[str, float]]]]] = {}
    for kind in settings.burst_images:
        sizes = layer_sizes(kind, settings.sizes)
        for clients in settings.burst_clients:
            by_system: dict[str, list[dict[str, float]]] = {system: [] for system in MEASURED}
            raw.setdefault(kind, {})[clients] = by_system
            for number in range(settings.runs):
                # The three systems share no cache: one image, in a repository each.
                prefix = f"burst/{kind}-c{clients}-r{number}"
                original = stack.publisher.publish(f"{prefix}/shoal", sizes, "burst")
                images = {system: stack.publisher.copy(original, f"{prefix}/{system}") for system in ANCHORS}
                images["shoal"] = original
                for system in rotate(MEASURED, number):
                    image = images[system]
                    result = burst(
                        stack.url(system),
                        image,
                        clients,
                        parallel=settings.client_parallel,
                        verify=settings.verify,
                    )
                    usage = stack.settled(image.repository)
                    record = {
                        "wall": result.wall,
                        "p50": percentile(result.clients, 0.5),
                        "p99": percentile(result.clients, 0.99),
                        "image_bytes": image.size,
                        "upstream_bytes": usage.bytes,
                        "amplification": usage.bytes / image.size,
                        "upstream_requests": usage.requests,
                        "retried": result.retried,
                        "blobs": len(image.blobs),
                    }
                    by_system[system].append(record)
                    say(
                        f"burst {kind} C={clients} run {number + 1}: {system} {result.wall:.2f}s, "
                        f"amplification {record['amplification']:.2f}, {usage.requests} upstream requests, "
                        f"{result.retried} retried"
                    )
    return _section(raw, settings)


def _section(raw: dict[str, dict[int, dict[str, list[dict[str, float]]]]], settings: Settings) -> Section:
    section = Section(
        "burst",
        "1",
        "Cold burst",
        (
            "C clients pull the same image at the same moment, cold: each asks for the manifest by tag, "
            f"then downloads the config and the layers, {settings.client_parallel} at a time, on its own "
            "connections, retrying a failed request up to 3 times as docker does (the failed requests "
            "column counts them). Wall time runs from the common start to the last client's last byte; p50/p99 "
            "are over the clients' own times. **Amplification** is the bytes the upstream sent for the "
            "image's repository (GET bodies, from the upstream's access log) divided by the image's "
            "bytes (manifest, config, layers): 1.0 means every byte crossed the upstream link once. "
            "The images: " + _images(settings) + "."
        ),
    )
    rows = []
    shoal_amplifications: list[float] = []
    exact = True
    for kind, by_clients in raw.items():
        for clients, by_system in by_clients.items():
            shoal_walls = [record["wall"] for record in by_system["shoal"]]
            for system, records in by_system.items():
                walls = [record["wall"] for record in records]
                amplification = [record["amplification"] for record in records]
                if system == "shoal":
                    shoal_amplifications += amplification
                    exact &= all(record["upstream_bytes"] == record["image_bytes"] for record in records)
                    relative = "—"
                else:
                    relative = show(ratios(shoal_walls, walls))
                    section.ratios.append(
                        Ratio(
                            f"{kind}, C={clients}: Shoal ÷ {_short(system)}", ratios(shoal_walls, walls), "burst", 1.0
                        )
                    )
                if system != "upstream":
                    # Straight from the upstream, every client's bytes cross the link: C by definition.
                    section.ratios.append(
                        Ratio(f"{_short(system)}, {kind}, C={clients}", amplification, "amplification")
                    )
                rows.append(
                    [
                        kind,
                        str(clients),
                        SYSTEMS[system],
                        show(walls, 2),
                        show([record["p50"] for record in records], 2),
                        show([record["p99"] for record in records], 2),
                        show(amplification, 2),
                        show([record["upstream_requests"] for record in records], 0),
                        show([record["retried"] for record in records], 0),
                        relative,
                    ]
                )
    section.tables.append(
        Table(
            [
                "image",
                "C",
                "system",
                "wall s",
                "client p50 s",
                "client p99 s",
                "amplification",
                "upstream requests",
                "failed requests (retried)",
                "Shoal's wall ÷ this",
            ],
            rows,
        )
    )
    worst = max(shoal_amplifications)
    section.targets.append(
        Target(
            "Amplification 1.0 at any C and node count",
            f"Shoal (3 nodes): {worst:.2f} at most over {len(shoal_amplifications)} bursts"
            + (" (byte for byte)" if exact else ""),
            exact,
        )
    )
    section.raw = {kind: {str(c): systems for c, systems in by_clients.items()} for kind, by_clients in raw.items()}
    return section


def _short(system: str) -> str:
    return {"shoal": "Shoal", "dist1": "distx1", "dist3": "distx3", "upstream": "upstream"}[system]


def _images(settings: Settings) -> str:
    parts = []
    for kind in settings.burst_images:
        sizes = layer_sizes(kind, settings.sizes)
        parts.append(f"`{kind}` = {len(sizes)} layers, {human_size(sum(sizes))} in all")
    return "; ".join(parts)
