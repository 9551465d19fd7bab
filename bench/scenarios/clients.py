"""Scenario 8: thousands of slow downloads at once, while small requests keep coming.

N clients (``bench/slow_clients.py``, one process) download one large blob
at a limited rate each, from Shoal's node 1 directly and from one
distribution proxy directly, one system after the other. While they run, a
prober asks for ``/v2/``, ``/healthz`` (Shoal only: distribution has no
health endpoint on its registry port) and a cached manifest, one request at
a time, and records how long each took. The blob is warm (cached on both
systems) or cold (a new one per system and count, so all N clients follow
one fill on Shoal).

Reported: small-request p50/p99 and failures, how many downloads were
progressing at the end, the slowest client's rate against the limit, and
for Shoal the node's resident memory and open descriptors per download and
its CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import memory
from bench.results import Section, Table, Target
from bench.scenarios import human_size, say
from bench.settings import Settings
from bench.stack import Stack
from node.media_types import ACCEPT_MANIFESTS

# Between two probes.
PROBE_INTERVAL = 0.02
PROBE_TIMEOUT = 5.0
# The targets.
P99_GOAL = 0.050
MEMORY_GOAL = 64 * 1024
# Seconds after the clients start before the node's memory and descriptors are read.
SETTLE = 0.6


@dataclass
class Probe:
    path: str
    times: list[float] = field(default_factory=list)
    failures: int = 0


@dataclass
class Record:
    system: str
    blob: str
    clients: int
    rate: int
    probes: dict[str, dict[str, float]]
    answered: int
    progressing: int
    slowest_rate: float
    errors: int
    rss_per_download: float | None = None
    fds_per_download: float | None = None
    cpu: float | None = None


def run(stack: Stack, settings: Settings) -> Section:
    records = []
    systems = {"shoal-node": stack.shoal.nodes[0].url, "dist1": stack.dist1.url}
    warm = stack.publisher.publish("clients/warm", (settings.sizes.clients_layer,), "clients-warm")
    digest, _ = warm.largest_blob
    for url in systems.values():
        with httpx.Client(timeout=120) as http:
            http.get(f"{url}/v2/{warm.repository}/manifests/{warm.tag}", headers=_ACCEPT).raise_for_status()
            http.get(f"{url}/v2/{warm.repository}/blobs/{digest}").raise_for_status()
    manifest = f"/v2/{warm.repository}/manifests/{warm.digest}"
    for count in settings.clients_counts:
        for temperature in ("warm", "cold"):
            for system, url in systems.items():
                if temperature == "warm":
                    path = f"/v2/{warm.repository}/blobs/{digest}"
                else:
                    image = stack.publisher.publish(
                        f"clients/cold-{system}-{count}", (settings.sizes.clients_layer,), f"cold-{system}-{count}"
                    )
                    path = f"/v2/{image.repository}/blobs/{image.largest_blob[0]}"
                workers = stack.shoal.nodes[0].worker_pids() if system == "shoal-node" else []
                record = _measure(stack.workdir, system, url, path, manifest, count, temperature, settings, workers)
                records.append(record)
                say(
                    f"{count} {temperature} clients on {system}: {record.answered} answered, "
                    f"{record.progressing} progressing, /v2/ p99 {record.probes['/v2/']['p99'] * 1000:.1f} ms"
                )
    return _section(records, settings)


_ACCEPT = {"Accept": ACCEPT_MANIFESTS}


def _measure(
    workdir: Path,
    system: str,
    url: str,
    path: str,
    manifest: str,
    count: int,
    temperature: str,
    settings: Settings,
    workers: list[int],
) -> Record:
    rate, seconds = settings.clients_rate, settings.clients_seconds
    probes = [Probe("/v2/"), Probe(manifest)] + ([Probe("/healthz")] if system == "shoal-node" else [])
    idle_rss = sum(memory.rss(worker) for worker in workers)
    idle_fds = sum(_fds(worker) for worker in workers)
    cpu_before = sum(_cpu_seconds(worker) for worker in workers)
    load = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.slow_clients",
            "--url",
            url,
            "--path",
            path,
            "--clients",
            str(count),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    stop = threading.Event()
    prober = threading.Thread(target=_probe, args=(url, probes, stop), daemon=True)
    started = time.monotonic()
    prober.start()
    samples: list[tuple[int, int]] = []
    while load.poll() is None and time.monotonic() - started < seconds + 30:
        if workers and time.monotonic() - started > seconds * SETTLE:
            samples.append((sum(memory.rss(w) for w in workers), sum(_fds(w) for w in workers)))
        time.sleep(0.5)
    output, _ = load.communicate(timeout=60)
    stop.set()
    prober.join()
    cpu = (sum(_cpu_seconds(worker) for worker in workers) - cpu_before) / seconds if workers else None
    result = json.loads(output)
    clients = result["clients"]
    answered = sum(1 for client in clients if client["status"].startswith("HTTP/1.1 200"))
    progressing = sum(1 for client in clients if client["recent"] > 0)
    slowest = min(client["recent"] for client in clients) / result["window"]
    record = Record(
        system,
        temperature,
        count,
        rate,
        {probe.path if probe.path != manifest else "manifest": _summary(probe) for probe in probes},
        answered,
        progressing,
        slowest / rate,
        sum(1 for client in clients if client["error"]),
    )
    if samples:
        peak_rss = max(sample[0] for sample in samples)
        peak_fds = max(sample[1] for sample in samples)
        record.rss_per_download = max(0, peak_rss - idle_rss) / count
        record.fds_per_download = max(0, peak_fds - idle_fds) / count
        record.cpu = cpu
    return record


def _probe(url: str, probes: list[Probe], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=PROBE_TIMEOUT, headers=_ACCEPT) as http:
        while not stop.is_set():
            for probe in probes:
                began = time.perf_counter()
                try:
                    ok = http.get(probe.path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    probe.times.append(time.perf_counter() - began)
                else:
                    probe.failures += 1
                    # A new connection for the next probe, as a health checker makes.
                    http.close()
                    http = httpx.Client(base_url=url, timeout=PROBE_TIMEOUT, headers=_ACCEPT)
            stop.wait(PROBE_INTERVAL)


def _summary(probe: Probe) -> dict[str, float]:
    times = sorted(probe.times)
    if not times:
        return {"p50": float("nan"), "p99": float("nan"), "count": 0, "failures": probe.failures}
    return {
        "p50": times[len(times) // 2],
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
        "count": len(times),
        "failures": probe.failures,
    }


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(value: float) -> str:
    return "—" if value != value else f"{value * 1000:.1f}"


def _section(records: list[Record], settings: Settings) -> Section:
    rate = human_size(settings.clients_rate)
    section = Section(
        "clients",
        "8",
        "Thousands of slow clients at once",
        (
            f"N clients (`bench/slow_clients.py`) each download one {human_size(settings.sizes.clients_layer)} "
            f"blob at {rate}/s for {settings.clients_seconds:g} s, from Shoal's node 1 directly (its default "
            "settings: 2 gevent workers) and from one distribution proxy directly. The blob is warm (cached) or "
            "cold (new for each system and N: on Shoal every client follows the one fill). Meanwhile a prober "
            "sends `GET /v2/`, `GET /healthz` (Shoal only) and a cached manifest by digest one after the other "
            f"every {PROBE_INTERVAL * 1000:.0f} ms; a request that fails or takes more than "
            f"{PROBE_TIMEOUT:g} s counts as failed. *Progressing*: downloads that received bytes in the last "
            "2 s; *slowest*: the slowest client's rate in that window against the limit. Memory and descriptors "
            "per download are the node's workers' peak above their idle values, divided by N; CPU is in cores."
        ),
    )
    rows = []
    for record in records:
        probes = record.probes
        health = probes.get("/healthz")
        rows.append(
            [
                "Shoal node" if record.system == "shoal-node" else "distribution proxy",
                record.blob,
                str(record.clients),
                f"{record.answered} / {record.progressing}",
                f"{record.slowest_rate:.2f}",
                f"{_ms(probes['/v2/']['p50'])} / {_ms(probes['/v2/']['p99'])}",
                "—" if health is None else f"{_ms(health['p50'])} / {_ms(health['p99'])}",
                f"{_ms(probes['manifest']['p50'])} / {_ms(probes['manifest']['p99'])}",
                str(int(sum(probe["failures"] for probe in probes.values()))),
                "—" if record.rss_per_download is None else f"{record.rss_per_download / 1024:.1f}",
                "—" if record.fds_per_download is None else f"{record.fds_per_download:.2f}",
                "—" if record.cpu is None else f"{record.cpu:.2f}",
            ]
        )
    section.tables.append(
        Table(
            [
                "system",
                "blob",
                "N",
                "answered / progressing",
                "slowest ÷ limit",
                "/v2/ p50 / p99 (ms)",
                "/healthz p50 / p99 (ms)",
                "manifest p50 / p99 (ms)",
                "failed probes",
                "KiB per download",
                "fds per download",
                "CPU",
            ],
            rows,
        )
    )
    shoal = [record for record in records if record.system == "shoal-node"]
    if shoal:
        top = max(record.clients for record in shoal)
        at_top = [record for record in shoal if record.clients == top]
        worst_p99 = max(max(record.probes[p]["p99"] for p in ("/v2/", "/healthz")) for record in at_top)
        failures = sum(sum(probe["failures"] for probe in record.probes.values()) for record in at_top)
        section.targets.append(
            Target(
                f"{top} concurrent downloads on one node, every one progressing",
                ", ".join(f"{record.blob}: {record.progressing} of {record.clients}" for record in at_top),
                all(record.progressing == record.clients for record in at_top),
            )
        )
        section.targets.append(
            Target(
                f"/healthz and /v2/ p99 within {P99_GOAL * 1000:.0f} ms and no failures during {top} downloads",
                f"worst p99 {worst_p99 * 1000:.1f} ms, {failures} failed",
                worst_p99 <= P99_GOAL and failures == 0,
            )
        )
        per_download = [record.rss_per_download for record in at_top if record.rss_per_download is not None]
        if per_download:
            section.targets.append(
                Target(
                    "Memory per open download at most 64 KiB",
                    f"{max(per_download) / 1024:.1f} KiB",
                    max(per_download) <= MEMORY_GOAL,
                )
            )
    section.raw = {"runs": [record.__dict__ for record in records]}
    return section
