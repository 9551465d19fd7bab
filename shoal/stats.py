"""``shoal stats``: the cluster's counters as a table, from any node's /debug/vars."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import httpx

from protos.metrics import DISTINCT_BYTES, TYPES, key

HELP = "show the cluster's counters as a table"
DESCRIPTION = (
    "Show requests, hit ratio, bytes pushed to clients and pulled from the upstream for every node "
    "and the whole cluster, and the upstream amplification (bytes pulled / distinct bytes cached), "
    "read from any node's /debug/vars."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``shoal stats``."""
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="any node of the cluster (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")


def _sum(counters: Mapping[str, int], counter: str) -> int:
    return sum(int(counters.get(key(kind, counter), 0)) for kind in TYPES)


def row(name: str, counters: Mapping[str, int], live: bool | None = None) -> dict[str, Any]:
    requests = _sum(counters, "requests")
    served = _sum(counters, "hits") + _sum(counters, "peer_hits")
    return {
        "node": name,
        "live": live,
        "requests": requests,
        "hits": _sum(counters, "hits"),
        "peer_hits": _sum(counters, "peer_hits"),
        "misses": _sum(counters, "misses"),
        "hit_ratio": round(served / requests, 4) if requests else None,
        "bytes_pushed": _sum(counters, "bytes_pushed"),
        "bytes_pulled": _sum(counters, "bytes_pulled"),
    }


def report(debug_vars: Mapping[str, Any]) -> dict[str, Any]:
    shoal = debug_vars["shoal"]
    nodes = [row(node_id, node["counters"], node["live"]) for node_id, node in sorted(shoal["nodes"].items())]
    cluster = row("cluster", shoal["cluster"])
    distinct = int(shoal["cluster"].get(DISTINCT_BYTES, 0))
    # Upstream amplification: bytes pulled from the upstream per distinct
    # byte the cluster holds. 1.0 means every byte was fetched once.
    cluster["distinct_bytes_cached"] = distinct
    cluster["upstream_amplification"] = round(cluster["bytes_pulled"] / distinct, 4) if distinct else None
    return {"nodes": nodes, "cluster": cluster}


def _size(value: int) -> str:
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{value} B"


def table(result: Mapping[str, Any]) -> str:
    header = ("NODE", "LIVE", "REQUESTS", "HIT RATIO", "PEER HITS", "MISSES", "PUSHED", "PULLED")
    lines = [header]
    for item in [*result["nodes"], result["cluster"]]:
        ratio = "-" if item["hit_ratio"] is None else f"{item['hit_ratio'] * 100:.1f}%"
        live = "" if item["live"] is None else ("yes" if item["live"] else "no")
        lines.append(
            (
                item["node"],
                live,
                str(item["requests"]),
                ratio,
                str(item["peer_hits"]),
                str(item["misses"]),
                _size(item["bytes_pushed"]),
                _size(item["bytes_pulled"]),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    amplification = result["cluster"]["upstream_amplification"]
    text.append("")
    text.append(
        f"distinct bytes cached: {_size(result['cluster']['distinct_bytes_cached'])}   upstream amplification: "
        + ("-" if amplification is None else f"{amplification:.2f}")
    )
    return "\n".join(text)


def fetch(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url.rstrip('/')}/debug/vars", timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def run(args: argparse.Namespace) -> int:
    while True:
        try:
            result = report(fetch(args.url))
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            print(f"shoal stats: cannot read {args.url}/debug/vars: {exc}", file=sys.stderr)
            if not args.watch:
                return 1
        else:
            if args.json:
                print(json.dumps(result, indent=2), flush=True)
            else:
                if args.watch:
                    print("\033[H\033[2J", end="")
                print(table(result), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
