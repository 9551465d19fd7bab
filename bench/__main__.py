"""``python -m bench``: set everything up on loopback, measure, tear down, write the results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from bench import issue12, report
from bench.results import Run, Section, section_from_dict
from bench.scenarios import burst, clients, follower, manifests, memory, pull, say, throughput
from bench.settings import QUICK, SCENARIOS, Settings, Sizes
from bench.stack import Stack
from node.config import parse_size

RUNNERS: dict[str, Callable[[Stack, Settings], Section | list[Section]]] = {
    "burst": burst.run,
    "pull": pull.run,
    "throughput": throughput.run,
    "manifests": manifests.run,
    "follower": follower.run,
    "memory": memory.run,
    "clients": clients.run,
}


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def _names(text: str, known: Sequence[str]) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if name not in known:
            raise argparse.ArgumentTypeError(f"unknown name {name!r}; known: {', '.join(known)}")
    return names


def _parser() -> argparse.ArgumentParser:
    defaults, sizes = Settings(), Sizes()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark Shoal against the distribution proxy (x1 and x3 behind HAProxy) and nginx, on loopback. "
            "Starts every server it needs, stops them all at the end (also on failure or Ctrl-C), and writes "
            "docs/benchmarks.md and docs/benchmarks.png. Sizes take units: 256KiB, 64MiB."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one run; writes no docs unless asked")
    parser.add_argument("--runs", type=int, help=f"repetitions of every measurement (default {defaults.runs})")
    parser.add_argument(
        "--only", type=lambda text: _names(text, SCENARIOS), help=f"scenarios to run: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--clients",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="cold burst client counts (default 8,32)",
    )
    parser.add_argument(
        "--burst-images",
        type=lambda text: _names(text, ("small", "many", "large")),
        help="images of the cold burst: small, many, large (default small)",
    )
    parser.add_argument(
        "--small-layers", type=_sizes, help="layer sizes of the small image (default 256KiB,1MiB,4MiB,8MiB)"
    )
    parser.add_argument("--many-layers", type=int, help=f"layers of the many-layer image (default {sizes.many_layers})")
    parser.add_argument("--many-layer-size", type=parse_size, help="size of each of them (default 256KiB)")
    parser.add_argument("--large-layer", type=parse_size, help="the large layer (default 256MiB)")
    parser.add_argument("--memory-layers", type=_sizes, help="two layer sizes for scenario 7 (default 32MiB,256MiB)")
    parser.add_argument("--follow-layer", type=parse_size, help="the layer of scenario 6 (default 64MiB)")
    parser.add_argument(
        "--follow-rate", type=parse_size, help="upstream bytes per second in scenario 6 (default 32MiB)"
    )
    parser.add_argument(
        "--manifest-seconds", type=int, help=f"load per measurement (default {defaults.manifest_seconds})"
    )
    parser.add_argument(
        "--slow-clients",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="scenario 8: how many slow clients at once (default 100,1000,2000)",
    )
    parser.add_argument("--slow-rate", type=parse_size, help="scenario 8: bytes per second per client (default 128KiB)")
    parser.add_argument("--slow-seconds", type=float, help="scenario 8: seconds per measurement (default 10)")
    parser.add_argument("--verify", action="store_true", help="clients check every blob's digest")
    parser.add_argument("--output", type=Path, help="Markdown report (default docs/benchmarks.md; none with --quick)")
    parser.add_argument("--chart", type=Path, help="PNG chart (default docs/benchmarks.png; none with --quick)")
    parser.add_argument("--no-chart", action="store_true", help="write no chart")
    parser.add_argument("--json", type=Path, help="also write every measured number as JSON")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: write the report and chart again from a file --json wrote",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where servers keep their data and logs, kept afterwards (default: a temporary directory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches) afterwards")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="JSON",
        help="a file --json wrote for an earlier version: the 'before' column of the issue 12 table",
    )
    parser.add_argument(
        "--profile",
        type=lambda text: _names(text, SCENARIOS),
        help="record py-spy profiles of node 1 during these scenarios (into the work directory)",
    )
    return parser


def settings_from(args: argparse.Namespace, argv: Sequence[str]) -> Settings:
    base = QUICK if args.quick else Settings()
    sizes = base.sizes
    size_changes = {
        "small_layers": args.small_layers,
        "many_layers": args.many_layers,
        "many_layer_size": args.many_layer_size,
        "large_layer": args.large_layer,
        "memory_layers": args.memory_layers,
        "follow_layer": args.follow_layer,
        "follow_rate": args.follow_rate,
    }
    sizes = dataclasses.replace(sizes, **{key: value for key, value in size_changes.items() if value is not None})
    if len(sizes.memory_layers) != 2 or sizes.memory_layers[0] >= sizes.memory_layers[1]:
        raise SystemExit("python -m bench: --memory-layers takes two sizes, the smaller first")
    changes = {
        "runs": args.runs,
        "follower_runs": args.runs,
        "scenarios": args.only,
        "burst_clients": args.clients,
        "burst_images": args.burst_images,
        "manifest_seconds": args.manifest_seconds,
        "clients_counts": args.slow_clients,
        "clients_rate": args.slow_rate,
        "clients_seconds": args.slow_seconds,
        "json": args.json,
        "workdir": args.workdir,
        "profile": args.profile,
    }
    settings = dataclasses.replace(base, sizes=sizes, **{k: v for k, v in changes.items() if v is not None})
    markdown = args.output if args.output is not None else (None if args.quick else settings.markdown)
    chart = args.chart if args.chart is not None else (None if args.quick else settings.chart)
    return dataclasses.replace(
        settings,
        markdown=markdown,
        chart=None if args.no_chart else chart,
        verify=settings.verify or args.verify,
        keep=args.keep,
        command=shlex.join(["python", "-m", "bench", *argv]),
    )


def _with_issue12(sections: list[Section], baseline: Path | None) -> list[Section]:
    """The sections with the issue 12 table first, its 'before' column from ``baseline``."""
    sections = [section for section in sections if section.key != "issue12"]
    earlier, command = None, None
    if baseline is not None:
        document = json.loads(baseline.read_text(encoding="utf-8"))
        earlier = [section_from_dict(section) for section in document["sections"]]
        command = document["command"]
    return [issue12.section(sections, earlier, command), *sections]


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(settings: Settings) -> list[Section]:
    # A directory the user named is kept; a temporary one goes unless --keep.
    temporary = settings.workdir is None
    if settings.workdir is not None and settings.workdir.exists() and any(settings.workdir.iterdir()):
        # Caches left there by an earlier run would make the cold pulls warm.
        raise SystemExit(f"python -m bench: the work directory {settings.workdir} must be empty or absent")
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"work directory {workdir}")
    sections: list[Section] = []
    try:
        with Stack(workdir) as stack:
            say("everything is up")
            for key in settings.scenarios:
                started = time.monotonic()
                if key in settings.profile:
                    from bench import profiling

                    output = workdir / "profiles" / f"{key}-node-1.txt"
                    with profiling.recording(stack.shoal.nodes[0].pid, output):
                        result = RUNNERS[key](stack, settings)
                    say(f"profile of node 1 during {key}: {output}\n{profiling.summary(output)}")
                else:
                    result = RUNNERS[key](stack, settings)
                sections += result if isinstance(result, list) else [result]
                say(f"{key} took {time.monotonic() - started:.0f}s")
    finally:
        if settings.keep or not temporary:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return sections


def write(sections: list[Section], run: Run, markdown: Path | None, chart_path: Path | None, data: Path | None) -> None:
    if chart_path is not None:
        from bench import chart

        chart.render(sections, chart_path)
        say(f"wrote {chart_path}")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report.render(sections, run, markdown, chart_path), encoding="utf-8")
        say(f"wrote {markdown}")
    if data is not None:
        data.parent.mkdir(parents=True, exist_ok=True)
        document = {**dataclasses.asdict(run), "sections": [dataclasses.asdict(section) for section in sections]}
        data.write_text(json.dumps(document, indent=1, default=str), encoding="utf-8")
        say(f"wrote {data}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    settings = settings_from(args, argv)
    if args.render is not None:
        # The measurements of an earlier run, written again (after an edit of bench/analysis.md, say).
        document = json.loads(args.render.read_text(encoding="utf-8"))
        sections = [section_from_dict(section) for section in document.pop("sections")]
        write(_with_issue12(sections, args.baseline), Run(**document), settings.markdown, settings.chart, None)
        return 0
    # Both unwind through every finally that stops a server; SIGINT is set
    # too because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    started, clock = report.now(), time.monotonic()
    try:
        sections = run(settings)
    except KeyboardInterrupt:
        print("python -m bench: interrupted; every server was stopped", file=sys.stderr)
        return 130
    measured = Run(settings.command, settings.runs, started.isoformat(), time.monotonic() - clock, report.machine())
    sections = _with_issue12(sections, args.baseline)
    write(sections, measured, settings.markdown, settings.chart, settings.json)
    for section in sections:
        for target in section.targets:
            say(f"{'met    ' if target.met else 'MISSED '} {target.goal}: {target.measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
