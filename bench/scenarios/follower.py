"""Scenario 6: a second client asks another node for a layer that is still arriving.

The stack's upstream is local and fast: a layer would be complete before a
second client could ask. This scenario starts its own two-node Shoal
cluster whose upstream is reached through a forwarder that paces the
upstream's bytes (``bench/throttle.py``), so the leader's download takes
seconds and the follower's first byte can be told apart from it.
"""

from __future__ import annotations

import time

from bench.client import Download
from bench.results import Ratio, Section, Table, Target
from bench.scenarios import human_size, median, say, show
from bench.scenarios.pull import COLD_GOAL
from bench.settings import Settings
from bench.stack import Stack, shoal_cluster
from bench.stats import ratios
from bench.throttle import Throttle
from testbed.cluster import Cluster

# The follower's first byte must come within this many seconds of asking.
GOAL = 0.100


def run(stack: Stack, settings: Settings) -> Section:
    sizes = settings.sizes
    throttle = Throttle(stack.workdir / "follower", stack.upstream.url, sizes.follow_rate)
    try:
        cluster = shoal_cluster(stack.workdir / "follower" / "shoal", throttle.url, nodes=2)
        try:
            # One round first, not counted: each worker's first request pays for
            # setting up its gRPC channel and its peer connections.
            _once(stack, cluster, throttle, settings, -1)
            records = [_once(stack, cluster, throttle, settings, number) for number in range(settings.follower_runs)]
        finally:
            cluster.close()
    finally:
        throttle.close()
    return _section(records, settings)


def _once(stack: Stack, cluster: Cluster, throttle: Throttle, settings: Settings, number: int) -> dict[str, float]:
    sizes = settings.sizes
    image = stack.publisher.publish(f"follower/r{number}", (sizes.follow_layer,), "follower")
    digest, size = image.largest_blob
    path = f"/v2/{image.repository}/blobs/{digest}"
    leader = Download(cluster.nodes[0].url + path).start()
    if not leader.first_byte.wait(60):
        raise RuntimeError("the leader's download never started")
    # Ask once the leader's fill is well under way, as a second machine would.
    time.sleep(min(0.25, size / sizes.follow_rate / 4))
    follower = Download(cluster.nodes[1].url + path).start()
    first = follower.wait()
    lead = leader.wait()
    if first.size != size or lead.size != size:
        raise RuntimeError(f"incomplete downloads: leader {lead.size}, follower {first.size} of {size} bytes")
    usage = stack.settled(image.repository)
    # The floor: the first byte of the same layer from node 2 once it holds it.
    cluster.nodes[1].stored_file(digest)
    hit = Download(cluster.nodes[1].url + path).start().wait()
    # The reference: the same layer straight from the upstream over the same slow link.
    direct = Download(throttle.url + path).start().wait()
    say(
        f"follower {'warm-up' if number < 0 else f'run {number + 1}'}: first byte {first.first_byte * 1000:.1f} ms "
        f"(a hit: {hit.first_byte * 1000:.1f} ms), done {first.total:.2f}s; leader {lead.total:.2f}s, "
        f"straight from the upstream {direct.total:.2f}s; "
        f"{usage.blob_gets} upstream GET of the blob"
    )
    return {
        "follower_first_byte": first.first_byte,
        "follower_total": first.total,
        "leader_total": lead.total,
        "leader_first_byte": lead.first_byte,
        "hit_first_byte": hit.first_byte,
        "direct_total": direct.total,
        "upstream_blob_gets": usage.blob_gets,
        "size": size,
    }


def _section(records: list[dict[str, float]], settings: Settings) -> Section:
    sizes = settings.sizes

    def values(key: str) -> list[float]:
        return [record[key] for record in records]

    first = values("follower_first_byte")
    relative = ratios(first, values("leader_total"))
    cold = ratios(values("leader_total"), values("direct_total"))
    section = Section(
        "follower",
        "6",
        "Follower time to first byte",
        (
            f"A client pulls a {human_size(sizes.follow_layer)} layer cold from node 1 of a two-node "
            f"cluster whose upstream link is paced to {human_size(sizes.follow_rate)}/s per connection by a "
            "forwarding proxy (`bench/throttle.py`); once its first bytes arrived, and a quarter of the "
            "expected transfer time later (at most 0.25 s), a second client asks node 2 for the same layer. "
            "Node 2 learns from the coordinator that node 1 is fetching it and streams node 1's growing "
            f"file. Times are from each client's request, over {settings.follower_runs} rounds; one round "
            "before the measured ones warms the "
            "workers' connections; for scale, the table also shows the first byte of the same layer from "
            "node 2 once node 2 holds it (a plain hit), and, as the reference for a cold pull over a slow "
            "link, the same layer pulled straight from the upstream through the same paced link."
        ),
    )
    section.tables.append(
        Table(
            ["measure", "value"],
            [
                ["follower: first byte (ms)", show([value * 1000 for value in first], 1)],
                ["follower: whole layer (s)", show(values("follower_total"), 2)],
                [
                    "node 2 once it holds the layer: first byte (ms)",
                    show([v * 1000 for v in values("hit_first_byte")], 1),
                ],
                ["leader: first byte (ms)", show([value * 1000 for value in values("leader_first_byte")], 1)],
                ["leader: whole layer (s)", show(values("leader_total"), 2)],
                ["straight from the upstream over the same link: whole layer (s)", show(values("direct_total"), 2)],
                ["follower's first byte ÷ leader's download", show(relative, 3)],
                ["leader's download ÷ straight from the upstream", show(cold, 3)],
                ["upstream GETs of the layer", show(values("upstream_blob_gets"), 0)],
            ],
        )
    )
    section.ratios.append(Ratio("follower, while node 1 fetches", [value * 1000 for value in first], "follower", 100.0))
    section.ratios.append(
        Ratio("a hit, once node 2 holds the layer", [value * 1000 for value in values("hit_first_byte")], "follower")
    )
    link = f"{human_size(sizes.follow_rate)}/s"
    section.ratios.append(
        Ratio(
            f"cold {human_size(sizes.follow_layer)} over a {link} link: node ÷ upstream", cold, "reference", COLD_GOAL
        )
    )
    section.targets.append(
        Target(
            f"Cold single pull within 10% of straight from the upstream, over a {link} link (leader of scenario 6)",
            f"node ÷ upstream: {median(cold):.2f}",
            median(cold) <= COLD_GOAL,
        )
    )
    section.targets.append(
        Target(
            "Follower first byte within 100 ms",
            f"{median(first) * 1000:.0f} ms (leader's download: {median(values('leader_total')):.2f} s)",
            median(first) <= GOAL,
        )
    )
    section.raw = {"runs": records}
    return section
