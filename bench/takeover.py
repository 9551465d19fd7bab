"""``python -m bench.takeover``: the fetching node killed mid-fetch, measured with the product's settings.

Runs ``testbed.takeover.kill_the_fetcher`` (a two-node cluster as shipped,
in front of a fake upstream pacing the blob) in three cases: node-2's
client following node-1's fetch with an upstream that honours Range, the
same with one that ignores Range, and node-2's client asking only after the
kill. Prints, per case and run, the time from the kill to node-2's complete
response against the target (the blob's transfer time plus 3 s), the time
to node-2's request to the upstream (the takeover), and the upstream's
bytes as a multiple of the blob.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from node.config import parse_size
from testbed.takeover import Takeover, kill_the_fetcher

# Per case: whether node-2's client follows node-1's fetch, and whether the upstream honours Range.
CASES: dict[str, tuple[bool, bool]] = {
    "followed, Range honoured": (True, True),
    "followed, Range ignored": (True, False),
    "asked after the kill": (False, True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.takeover", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("64MiB"), help="the blob (default 64MiB)")
    parser.add_argument("--rate", type=float, default=20e6, help="the upstream's pace, bytes/s (default 20e6)")
    parser.add_argument("--kill-at", type=parse_size, default=parse_size("10MiB"), help="bytes sent before the kill")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (default 3)")
    args = parser.parse_args(argv)
    print(f"blob {args.size} bytes at {args.rate / 1e6:g} MB/s, node-1 killed after {args.kill_at} upstream bytes")
    for case, (follow, honour_range) in CASES.items():
        runs: list[Takeover] = []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="shoal-takeover-") as workdir:
                taken = kill_the_fetcher(
                    Path(workdir),
                    size=args.size,
                    rate=args.rate,
                    kill_at=args.kill_at,
                    follow=follow,
                    honour_range=honour_range,
                    product_defaults=True,
                )
            runs.append(taken)
            print(
                f"{case}, run {run + 1}: {taken.seconds:.2f}s from the kill (target {taken.transfer + 3:.2f}s), "
                f"taken over after {taken.taken_over:.2f}s, upstream {taken.blobs:.3f} blobs, "
                f"Range asked: {taken.ranged}"
            )
        seconds = statistics.median(taken.seconds for taken in runs)
        taken_over = statistics.median(taken.taken_over for taken in runs)
        blobs = statistics.median(taken.blobs for taken in runs)
        print(f"{case}: median {seconds:.2f}s to the response, {taken_over:.2f}s to the takeover, {blobs:.3f} blobs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
