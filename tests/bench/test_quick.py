"""The benchmark harness end to end with tiny sizes, so that it cannot rot.

``python -m bench --quick`` runs as a user would run it: it starts the
upstream, the distribution proxies, a Shoal cluster, HAProxy and nginx,
runs every scenario once, and stops everything. The test checks that it
worked, that Shoal took every byte of an image from the upstream exactly
once, and that no process outlived it. It asserts no timing: on a shared
test machine timings mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"burst", "cold", "warm", "throughput", "manifests", "follower", "memory", "clients", "issue12"}


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment names ``text``.

    A node's gunicorn has its configuration file only in its environment.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environment = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in command or text in environment:
            found.append(f"{entry.name}: {command}")
    return found


@pytest.mark.integration
def test_the_quick_benchmark_runs_end_to_end_and_shoal_fetches_each_byte_once(tmp_path: Path) -> None:
    report, chart, data, work = (tmp_path / name for name in ("bench.md", "bench.png", "bench.json", "work"))
    command = [sys.executable, "-m", "bench", "--quick", "--output", report, "--chart", chart, "--json", data]
    result = subprocess.run(
        [*map(str, command), "--workdir", str(work)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-8000:]
    assert not _processes_mentioning(str(work)), "the harness left processes running"

    sections = {section["key"]: section for section in json.loads(data.read_text())["sections"]}
    assert set(sections) == SECTIONS
    bursts = [
        record
        for by_clients in sections["burst"]["raw"].values()
        for by_system in by_clients.values()
        for record in by_system["shoal"]
    ]
    assert bursts
    for record in bursts:
        assert record["upstream_bytes"] == record["image_bytes"], f"Shoal's amplification in a burst: {record}"
    for kind, by_system in sections["cold"]["raw"].items():
        for system in ("shoal", "shoal-node"):
            for record in by_system[system]:
                assert record["cold_upstream_bytes"] == record["image_bytes"], f"{system}, {kind}: {record}"
    for record in sections["follower"]["raw"]["runs"]:
        assert record["upstream_blob_gets"] == 1, f"the follower caused another upstream fetch: {record}"

    for record in sections["clients"]["raw"]["runs"]:
        if record["system"] == "shoal-node":
            assert record["answered"] == record["clients"], f"slow clients left unanswered: {record}"

    text = report.read_text()
    for number in range(1, 9):
        assert f"\n## {number}. " in text
    assert "python -m bench --quick" in text
    assert chart.read_bytes().startswith(b"\x89PNG")
