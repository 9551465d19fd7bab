"""The media types of manifests, and the Accept header that asks for any of them.

A manifest is an image manifest or an index of them (one per platform), in
the OCI format or Docker's schema 2. A registry answers a manifest request
only in a form the request's Accept header names, so every manifest request
made in this repository sends ``ACCEPT_MANIFESTS``: the node's to its
upstream, ``shoal warm``'s to the cluster, the benchmark's and the tests'.

Like ``node/reference.py`` a piece of the protocol rather than of the
server, so the command line (``shoal/``) may import it too.
"""

from __future__ import annotations

import json

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCTET_STREAM = "application/octet-stream"


def manifest_media_type(stated: str | None, data: bytes) -> str:
    """The media type to serve a manifest with: ``stated``, else what its document says.

    A manifest fetched through the blob endpoint was stated as
    ``application/octet-stream`` (or as nothing). Then, as distribution
    tells manifests apart: the document's ``mediaType``; without one, an
    OCI index if it lists ``manifests``, an OCI image manifest if it has a
    ``config``, Docker's schema 1 by its ``schemaVersion``. Anything else
    stays ``application/octet-stream``.
    """
    if stated and stated != OCTET_STREAM:
        return stated
    try:
        document = json.loads(data)
    except ValueError:
        return OCTET_STREAM
    if not isinstance(document, dict):
        return OCTET_STREAM
    named = document.get("mediaType")
    if isinstance(named, str) and named:
        return named
    version = document.get("schemaVersion")
    if version == 2 and isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if version == 2 and isinstance(document.get("config"), dict):
        return OCI_MANIFEST
    if version == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in document else DOCKER_SCHEMA1
    return OCTET_STREAM
