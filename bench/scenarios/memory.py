"""Scenario 7: a node worker's peak memory while it serves a layer, cold and warm, at two sizes."""

from __future__ import annotations

from bench import memory
from bench.client import fetch_blob, http_client
from bench.results import Ratio, Section, Table, Target
from bench.scenarios import human_size, median, mib, say, show
from bench.settings import Settings
from bench.stack import Stack

# Flat: the larger layer may raise the peak by at most this share of the bytes
# it adds, or by the noise floor of a Python process, whichever is larger.
SHARE = 0.05
NOISE = 4 * 1024 * 1024


def run(stack: Stack, settings: Settings) -> Section:
    node = stack.shoal.nodes[0]
    raw: dict[int, dict[str, list[dict[str, float]]]] = {}
    for size in settings.sizes.memory_layers:
        raw[size] = {"cold": [], "warm": []}
        for number in range(settings.runs):
            image = stack.publisher.publish(f"memory/{size}-r{number}", (size,), "memory")
            digest, blob_size = image.largest_blob
            url = f"{node.url}/v2/{image.repository}/blobs/{digest}"
            for phase in ("cold", "warm"):
                workers = node.worker_pids()
                if not workers:
                    raise RuntimeError(f"node 1 (pid {node.pid}) has no workers")
                for pid in workers:
                    memory.reset_peak(pid)
                before = {pid: memory.rss(pid) for pid in workers}
                with http_client(1) as client:
                    fetch_blob(client, url, blob_size)
                if phase == "cold":
                    # Warm means from the store, not from the fill's verified partial file.
                    node.stored_file(digest)
                growth = max(memory.peak(pid) - before[pid] for pid in workers)
                peak = max(memory.peak(pid) for pid in workers)
                raw[size][phase].append({"growth": growth, "peak": peak, "blob": blob_size})
                say(
                    f"memory {mib(size):.0f} MiB run {number + 1} {phase}: +{mib(growth):.1f} MiB, peak {mib(peak):.0f}"
                )
    return _section(raw, settings)


def _section(raw: dict[int, dict[str, list[dict[str, float]]]], settings: Settings) -> Section:
    small, large = settings.sizes.memory_layers
    section = Section(
        "memory",
        "7",
        "Worker memory",
        (
            "Node 1 serves a fresh layer cold (fetching it from the upstream while the client follows the "
            "growing file), then the same layer warm (from its file). Before each download the peak resident size "
            "(`VmHWM`) of each of the node's gunicorn workers is reset (`echo 5 > /proc/PID/clear_refs`); "
            "after it, the table shows how far the peak rose above the resident size at the reset (the "
            "largest rise among the workers), and the peak itself."
        ),
    )
    rows = []
    for size, phases in raw.items():
        for phase, records in phases.items():
            rows.append(
                [
                    human_size(size),
                    phase,
                    show([mib(record["growth"]) for record in records], 1),
                    show([mib(record["peak"]) for record in records], 0),
                ]
            )
    section.tables.append(Table(["layer", "served", "peak rise MiB", "worker peak MiB"], rows))
    for phase in ("cold", "warm"):
        for size in (small, large):
            rises = [mib(record["growth"]) for record in raw[size][phase]]
            section.ratios.append(Ratio(f"{phase}, {human_size(size)} layer", rises, "memory"))
    allowed = max(SHARE * (large - small), NOISE)
    measured = []
    met = True
    for phase in ("cold", "warm"):
        rise = median([r["growth"] for r in raw[large][phase]]) - median([r["growth"] for r in raw[small][phase]])
        met &= rise <= allowed
        measured.append(f"{phase} {mib(rise):+.1f} MiB")
    section.targets.append(
        Target(
            "Worker memory flat in blob size",
            f"peak rise from the {human_size(small)} to the {human_size(large)} layer: " + ", ".join(measured),
            met,
        )
    )
    section.notes.append(
        f"Flat means here: the {human_size(large - small)} the larger layer adds raise the peak by less "
        f"than {SHARE:.0%} of that, or than {human_size(NOISE)} if that is more: {mib(allowed):.1f} MiB."
    )
    section.raw = {str(size): phases for size, phases in raw.items()}
    return section
