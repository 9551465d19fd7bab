"""The generated gRPC code checked in next to the .proto files is up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protos.generate import PROTO_FILES, ROOT, generated_files


def test_checked_in_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    # Run the documented command itself, so the test also proves it works.
    subprocess.run(
        [sys.executable, "-m", "protos.generate", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True
    )

    stale = [
        name
        for proto in PROTO_FILES
        for name in generated_files(proto)
        if (tmp_path / name).read_bytes() != (ROOT / name).read_bytes()
    ]

    assert stale == [], f"regenerate with `python -m protos.generate`; stale: {stale}"


def test_generated_modules_import_by_their_package_path() -> None:
    from protos.shoal.v1 import coordinator_pb2, coordinator_pb2_grpc

    assert coordinator_pb2.DESCRIPTOR.package == "shoal.v1"
    assert hasattr(coordinator_pb2_grpc, "CoordinatorStub")
