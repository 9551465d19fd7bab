"""node.media_types: the Accept header every manifest request sends, and a manifest's own type."""

from __future__ import annotations

import json

import pytest

from node.media_types import ACCEPT_MANIFESTS, manifest_media_type


def test_accept_lists_every_manifest_type() -> None:
    assert ACCEPT_MANIFESTS.split(", ") == [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]


@pytest.mark.parametrize(
    ("stated", "document", "expected"),
    [
        pytest.param("application/x-stated", {"mediaType": "other"}, "application/x-stated", id="stated wins"),
        pytest.param(
            "application/octet-stream",
            {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json"},
            "application/vnd.docker.distribution.manifest.v2+json",
            id="mediaType field",
        ),
        pytest.param(
            "", {"schemaVersion": 2, "manifests": []}, "application/vnd.oci.image.index.v1+json", id="OCI index"
        ),
        pytest.param(
            None,
            {"schemaVersion": 2, "config": {}, "layers": []},
            "application/vnd.oci.image.manifest.v1+json",
            id="OCI manifest",
        ),
        pytest.param(
            None,
            {"schemaVersion": 1, "signatures": []},
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            id="signed schema 1",
        ),
        pytest.param(None, {"schemaVersion": 1}, "application/vnd.docker.distribution.manifest.v1+json", id="schema 1"),
        pytest.param(None, {"schemaVersion": 3}, "application/octet-stream", id="unknown"),
        pytest.param(None, [1, 2], "application/octet-stream", id="not an object"),
    ],
)
def test_a_manifest_without_a_stated_type_gets_its_own(stated: str | None, document: object, expected: str) -> None:
    assert manifest_media_type(stated, json.dumps(document).encode()) == expected


def test_bytes_that_are_not_json_stay_octet_stream() -> None:
    assert manifest_media_type(None, b"\x1f\x8b not json") == "application/octet-stream"
