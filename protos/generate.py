"""Regenerate the Python code checked in next to the .proto files.

Run from anywhere::

    python -m protos.generate            # rewrite the checked-in files
    python -m protos.generate --out DIR  # write them under DIR instead

protoc runs with ``-I .`` from the project root, so every generated module
imports its siblings as ``protos.shoal.v1...``, the path the code imports
them by. ``tests/protos/test_generated.py`` generates into a temporary
directory and fails when the checked-in files differ, so a .proto edit
without regeneration never reaches a commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every .proto file of the project, relative to the project root.
PROTO_FILES = ("protos/shoal/v1/coordinator.proto",)


def generated_files(proto: str) -> tuple[str, ...]:
    """The files protoc writes for ``proto``, relative to the output directory."""
    stem = proto.removesuffix(".proto")
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def generate(out: Path = ROOT) -> list[Path]:
    """Run protoc for every .proto file, writing under ``out``; return the written files.

    protoc runs in a child process with the project root as its working
    directory, so that ``-I .`` means the root wherever this is called from
    and the caller's working directory is never changed.
    """
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools;
    # none is imported today, but a future import should just work.
    well_known = resources.files("grpc_tools") / "_proto"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        "-I",
        str(well_known),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed with exit code {result.returncode}:\n{result.stderr}")
    return [out / name for proto in PROTO_FILES for name in generated_files(proto)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate",
        description="Regenerate the gRPC Python code from the .proto files under protos/.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT,
        help="directory to write under (default: the project root, replacing the checked-in files)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
