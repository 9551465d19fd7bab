"""Scenario 4: a warm large blob from one node, against nginx sending the same file."""

from __future__ import annotations

from bench.client import fetch_blob, http_client
from bench.load import curl_throughput
from bench.results import Ratio, Section, Table, Target
from bench.scenarios import human_size, median, mib, rotate, say, show
from bench.settings import Settings
from bench.stack import SYSTEMS, Stack
from bench.stats import ratios

MEASURED = ("shoal-node", "nginx")
# A warm blob from a node must come at 80% of nginx's rate or better.
GOAL = 0.80


def run(stack: Stack, settings: Settings) -> Section:
    image = stack.publisher.publish("throughput/large", (settings.sizes.large_layer,), "throughput")
    digest, size = image.largest_blob
    node = stack.shoal.nodes[0]
    urls = {"shoal-node": f"{node.url}/v2/{image.repository}/blobs/{digest}"}
    with http_client(1) as client:
        # The cold pull puts the blob into node 1's store; the second fills the page cache.
        fetch_blob(client, urls["shoal-node"], size, digest)
        node.stored_file(digest)
        fetch_blob(client, urls["shoal-node"], size, digest)
    urls["nginx"] = stack.nginx.url(node.stored_file(digest))
    curl_throughput(urls["nginx"], 1, 1, size)

    raw: dict[int, dict[str, list[float]]] = {
        c: {system: [] for system in MEASURED} for c in settings.throughput_concurrency
    }
    for number in range(settings.runs):
        for concurrency in settings.throughput_concurrency:
            for system in rotate(MEASURED, number):
                rate = curl_throughput(urls[system], concurrency, settings.throughput_repeats, size)
                raw[concurrency][system].append(rate)
                say(f"throughput run {number + 1}: {system} x{concurrency} {mib(rate):.0f} MiB/s")

    section = Section(
        "throughput",
        "4",
        "Warm large-blob throughput",
        (
            f"A {human_size(size)} blob already in node 1's store, downloaded straight from the node "
            "(gunicorn's `wsgi.file_wrapper`, sent with sendfile) and from nginx serving the node's very "
            "file with "
            f"`sendfile on`. `curl` is the client; N curls each download the blob {settings.throughput_repeats} "
            "times and the rate is all their bytes over the wall time. Loopback: client and server share the "
            "machine's two cores."
        ),
    )
    rows = []
    met = True
    measured = []
    for concurrency, by_system in raw.items():
        relative = ratios(by_system["shoal-node"], by_system["nginx"])
        for system, rates in by_system.items():
            rows.append(
                [
                    str(concurrency),
                    SYSTEMS[system],
                    show([mib(rate) for rate in rates], 0),
                    show(relative) if system == "shoal-node" else "—",
                ]
            )
        section.ratios.append(Ratio(f"warm blob x{concurrency}: node ÷ nginx", relative, "reference", GOAL))
        met &= median(relative) >= GOAL
        measured.append(f"{median(relative):.2f} with {concurrency}")
    section.tables.append(Table(["concurrent downloads", "server", "MiB/s", "node ÷ nginx"], rows))
    section.targets.append(
        Target("Warm large-blob throughput ≥ 80% of nginx", "node ÷ nginx: " + ", ".join(measured), met)
    )
    section.raw = {str(c): by_system for c, by_system in raw.items()}
    return section
