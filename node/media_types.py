"""The media types of manifests, and the Accept header that asks for any of them.

A manifest is an image manifest or an index of them (one per platform), in
the OCI format or Docker's schema 2. A registry answers a manifest request
only in a form the request's Accept header names, so every manifest request
made in this repository sends ``ACCEPT_MANIFESTS``: the node's to its
upstream, ``shoal warm``'s to the cluster, the benchmark's and the tests'.

Constants only, like ``node/reference.py`` a piece of the protocol rather
than of the server, so the command line (``shoal/``) may import it too.
"""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
