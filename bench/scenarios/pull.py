"""Scenarios 2 and 3: one client pulls an image cold, then again warm.

Both come from one pass: for every system a fresh image is pulled once
(cold: scenario 2), then ``warm_repeats`` times more (warm: scenario 3),
and the upstream's access log says what each phase asked of it.
"""

from __future__ import annotations

from bench.client import Failures, pull
from bench.publisher import layer_sizes
from bench.results import Ratio, Section, Table, Target
from bench.scenarios import human_size, median, rotate, say, show
from bench.settings import Settings
from bench.stack import SYSTEMS, Stack
from bench.stats import ratios

KINDS = ("small", "many", "large")
MEASURED = ("upstream", "upstream-lb", "shoal-node", "shoal", "dist1", "dist3")
# A cold pull of Shoal must be within 10% of a pull straight from the upstream.
COLD_GOAL = 1.10

Records = dict[str, dict[str, list[dict[str, float]]]]


def run(stack: Stack, settings: Settings) -> list[Section]:
    raw: Records = {kind: {system: [] for system in MEASURED} for kind in KINDS}
    for number in range(settings.runs):
        for kind in KINDS:
            sizes = layer_sizes(kind, settings.sizes)
            # Shoal's two entries share one cluster, so they get images of their
            # own; the other systems share no cache and get copies of one image.
            prefix = f"pull/{kind}-r{number}"
            original = stack.publisher.publish(f"{prefix}/shoal-node", sizes, "pull")
            images = {"shoal": stack.publisher.publish(f"{prefix}/shoal", sizes, "pull"), "shoal-node": original}
            for system in MEASURED:
                if system not in images:
                    images[system] = stack.publisher.copy(original, f"{prefix}/{system}")
            for system in rotate(MEASURED, number):
                image = images[system]
                url = stack.url(system)
                failures = Failures()
                cold = pull(url, image, parallel=settings.client_parallel, verify=settings.verify, failures=failures)
                after_cold = stack.settled(image.repository)
                warm = [
                    pull(url, image, parallel=settings.client_parallel, verify=settings.verify, failures=failures)
                    for _ in range(settings.warm_repeats)
                ]
                after_warm = stack.settled(image.repository) - after_cold
                raw[kind][system].append(
                    {
                        "cold": cold,
                        "warm_first": warm[0],
                        "warm": warm[-1],
                        "image_bytes": image.size,
                        "cold_upstream_bytes": after_cold.bytes,
                        "cold_upstream_requests": after_cold.requests,
                        "warm_upstream_requests": after_warm.requests / len(warm),
                        "retried": failures.count,
                    }
                )
                say(
                    f"pull {kind} run {number + 1}: {system} cold {cold:.2f}s, warm {warm[0]:.3f}s to {warm[-1]:.3f}s, "
                    f"upstream {after_cold.requests} then {after_warm.requests} requests"
                )
    return [_cold_section(raw, settings), _warm_section(raw, settings)]


def _retried(records: list[dict[str, float]]) -> bool:
    return any(record["retried"] for record in records)


def _values(records: list[dict[str, float]], key: str) -> list[float]:
    return [record[key] for record in records]


def _cold_section(raw: Records, settings: Settings) -> Section:
    section = Section(
        "cold",
        "2",
        "Cold single pull",
        (
            "One client pulls a fresh image (manifest by tag, then the blobs, "
            f"{settings.client_parallel} at a time). The reference is the same pull straight from the "
            "upstream, directly and through HAProxy; the ratio is taken run by run. Images: " + _images(settings) + "."
        ),
    )
    rows = []
    met = True
    measured = []
    for kind, by_system in raw.items():
        direct = _values(by_system["upstream"], "cold")
        behind = _values(by_system["upstream-lb"], "cold")
        for system, records in by_system.items():
            seconds = _values(records, "cold")
            reference = behind if system in ("shoal", "dist1", "dist3", "upstream-lb") else direct
            relative = ratios(seconds, reference)
            rows.append(
                [
                    kind,
                    SYSTEMS[system],
                    show(seconds, 3),
                    show(
                        [record["image_bytes"] / value / 2**20 for record, value in zip(records, seconds, strict=True)],
                        0,
                    ),
                    show(_values(records, "cold_upstream_requests"), 0),
                    show([r["cold_upstream_bytes"] / r["image_bytes"] for r in records], 2),
                    "—" if system in ("upstream", "upstream-lb") else show(relative),
                ]
            )
        node = ratios(_values(by_system["shoal-node"], "cold"), direct)
        cluster = ratios(_values(by_system["shoal"], "cold"), behind)
        section.ratios.append(Ratio(f"cold {kind}: Shoal node ÷ upstream", node, "reference", COLD_GOAL))
        section.ratios.append(Ratio(f"cold {kind}: Shoal via LB ÷ upstream via LB", cluster, "reference", COLD_GOAL))
        met &= median(node) <= COLD_GOAL
        measured.append(f"{kind} {median(node):.2f}")
    section.tables.append(
        Table(
            [
                "image",
                "system",
                "seconds",
                "MiB/s",
                "upstream requests",
                "amplification",
                "÷ upstream (directly, or through HAProxy for systems behind it)",
            ],
            rows,
        )
    )
    retried = sorted(
        {SYSTEMS[system] for by_system in raw.values() for system, records in by_system.items() if _retried(records)}
    )
    if retried:
        section.notes.append(
            "Some requests failed and were retried (up to 3 times, as docker does), cold or warm, with: "
            + ", ".join(retried)
            + "."
        )
    section.notes.append(
        "Distribution's proxy (2.8, as Debian ships it) fetches every blob of a miss twice: one stream for "
        "the client, one of its own to store the blob; hence its amplification of 2 for a single client. "
        "The second fetch may end after the client's, so the harness waits for the upstream's gauge of "
        "requests in flight to fall to zero before it reads the access log."
    )
    section.targets.append(
        Target(
            "Cold single pull within 10% of pulling straight from the upstream",
            "Shoal node ÷ upstream: " + ", ".join(measured),
            met,
        )
    )
    section.raw = {kind: dict(by_system) for kind, by_system in raw.items()}
    return section


def _warm_section(raw: Records, settings: Settings) -> Section:
    section = Section(
        "warm",
        "3",
        "Warm pull",
        (
            f"Right after its cold pull, the same client pulls the image {settings.warm_repeats} more times. "
            "*First* is the pull right after the cold one; *last* is the last of them, when the caches have "
            "settled. Through a load balancer the difference matters: the round robin sends a blob to a node "
            "(or distribution instance) that did not fetch it. A Shoal node then copies it from the peer "
            "that holds it (so the first warm pulls still move bytes between nodes, but none from the "
            "upstream); a distribution instance fetches it from the upstream again (the upstream requests "
            "column). The ratio compares the last pulls: Shoal's time (through HAProxy) divided by the "
            "system's, run by run; below 1 Shoal is faster."
        ),
    )
    rows = []
    for kind, by_system in raw.items():
        shoal = _values(by_system["shoal"], "warm")
        for system, records in by_system.items():
            seconds = _values(records, "warm")
            relative = ratios(shoal, seconds)
            rows.append(
                [
                    kind,
                    SYSTEMS[system],
                    show(_values(records, "warm_first"), 3),
                    show(seconds, 3),
                    show(
                        [record["image_bytes"] / value / 2**20 for record, value in zip(records, seconds, strict=True)],
                        0,
                    ),
                    show(_values(records, "warm_upstream_requests"), 1),
                    "—" if system == "shoal" else show(relative),
                ]
            )
            if system in ("dist1", "dist3"):
                label = {"dist1": "distx1", "dist3": "distx3"}[system]
                section.ratios.append(Ratio(f"warm {kind}: Shoal ÷ {label}", relative, "warm", 1.0))
    section.tables.append(
        Table(
            [
                "image",
                "system",
                "first warm pull s",
                "last warm pull s",
                "MiB/s (last)",
                "upstream requests per warm pull",
                "Shoal ÷ this (last)",
            ],
            rows,
        )
    )
    return section


def _images(settings: Settings) -> str:
    parts = []
    for kind in KINDS:
        sizes = layer_sizes(kind, settings.sizes)
        parts.append(f"`{kind}` = {len(sizes)} layer{'s' if len(sizes) > 1 else ''}, {human_size(sum(sizes))}")
    return "; ".join(parts)
