"""node.media_types: the Accept header every manifest request sends."""

from __future__ import annotations

from node.media_types import ACCEPT_MANIFESTS


def test_accept_lists_every_manifest_type() -> None:
    assert ACCEPT_MANIFESTS.split(", ") == [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
