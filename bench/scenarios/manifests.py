"""Scenario 5: warm manifest requests per second, by tag and by digest."""

from __future__ import annotations

import httpx

from bench.load import wrk_rate
from bench.publisher import layer_sizes
from bench.results import Ratio, Section, Table, Target
from bench.scenarios import median, rotate, say, show
from bench.settings import Settings
from bench.stack import SYSTEMS, Stack
from bench.stats import ratios
from node.media_types import ACCEPT_MANIFESTS

MEASURED = ("shoal", "shoal-node", "dist1", "dist3", "upstream")
MODES = ("tag", "digest")


def run(stack: Stack, settings: Settings) -> Section:
    urls: dict[tuple[str, str], str] = {}
    repositories = {}
    original = stack.publisher.publish("manifests/original", layer_sizes("small", settings.sizes), "manifests")
    for system in MEASURED:
        image = stack.publisher.copy(original, f"manifests/{system}")
        repositories[system] = image.repository
        base = f"{stack.url(system)}/v2/{image.repository}/manifests"
        urls[system, "tag"] = f"{base}/{image.tag}"
        urls[system, "digest"] = f"{base}/{image.digest}"
        # Warm: a few of each, so every instance behind the balancer has seen both.
        with httpx.Client(headers={"Accept": ACCEPT_MANIFESTS}, timeout=30) as client:
            for _ in range(6):
                for mode in MODES:
                    response = client.get(urls[system, mode])
                    if response.status_code != 200:
                        raise RuntimeError(f"{urls[system, mode]} answered {response.status_code}")

    raw: dict[str, dict[str, list[dict[str, float]]]] = {mode: {s: [] for s in MEASURED} for mode in MODES}
    for number in range(settings.runs):
        for mode in MODES:
            for system in rotate(MEASURED, number):
                before = stack.settled(repositories[system])
                rate = wrk_rate(urls[system, mode], settings.manifest_seconds, settings.manifest_connections)
                caused = stack.settled(repositories[system]) - before
                raw[mode][system].append(
                    {
                        "rate": rate.requests_per_second,
                        "requests": rate.requests,
                        "upstream": caused.requests,
                        "p99": rate.p99,
                    }
                )
                say(
                    f"manifests by {mode} run {number + 1}: {system} {rate.requests_per_second:.0f}/s, "
                    f"{caused.requests} upstream requests for {rate.requests}"
                )

    section = Section(
        "manifests",
        "5",
        "Warm manifest requests",
        (
            f"`wrk` with {settings.manifest_connections} keep-alive connections asks for one manifest for "
            f"{settings.manifest_seconds} s, by tag and by digest, with a registry client's `Accept` header, "
            "after a few warming requests. The upstream column counts the requests the system sent the "
            "upstream meanwhile. Shoal answers a tag from the cluster for `tag_ttl` (default 5 minutes) "
            "after its last check; distribution's proxy asks the upstream on every request by tag. The "
            "upstream itself (a registry serving its own storage) is listed as the reference for Go."
        ),
    )
    rows = []
    targets = []
    for mode, by_system in raw.items():
        shoal = [record["rate"] for record in by_system["shoal"]]
        for system, records in by_system.items():
            rates = [record["rate"] for record in records]
            relative = ratios(shoal, rates)
            rows.append(
                [
                    mode,
                    SYSTEMS[system],
                    show(rates, 0),
                    show([record["p99"] * 1000 for record in records], 1),
                    show([record["upstream"] for record in records], 0),
                    show([record["upstream"] / record["requests"] for record in records], 3),
                    "—" if system == "shoal" else show(relative),
                ]
            )
            if system in ("dist1", "dist3"):
                label = {"dist1": "distx1", "dist3": "distx3"}[system]
                section.ratios.append(Ratio(f"by {mode}: Shoal ÷ {label}", relative, "manifests", 1.0))
                if mode == "tag":
                    targets.append((label, median(relative)))
    section.tables.append(
        Table(
            [
                "by",
                "system",
                "requests/s",
                "p99 ms",
                "upstream requests",
                "upstream requests per request",
                "Shoal's rate ÷ this",
            ],
            rows,
        )
    )
    section.targets.append(
        Target(
            "Warm manifest-by-tag rate above the distribution proxy's",
            "Shoal ÷ " + ", ".join(f"{label}: {value:.2f}" for label, value in targets),
            all(value > 1.0 for _, value in targets),
        )
    )
    digest = ratios(
        [record["rate"] for record in raw["digest"]["shoal"]], [record["rate"] for record in raw["digest"]["dist1"]]
    )
    section.notes.append(
        f"By digest, Shoal through HAProxy reaches {median(digest):.2f} of distribution x1's rate; "
        "see *Where the time goes* for a profile of a node's worker under this load."
    )
    section.raw = raw
    return section
