"""Lease names: which fetch a cluster-wide lease guards.

Part of the contract between nodes and coordinators, like the .proto. A
node acquires the lease before it asks the upstream, so that the cluster
asks once; the coordinator fences writes with it (``CompleteFetch`` for
content, ``PutTag`` for a tag pointer) and tells other nodes who fetches a
digest now (``Locate`` with the blob's lease name). These are lease names,
not Redis keys: the coordinator's ``Keys`` turns them into keys.

===============================  =============================================
``blob:<digest>``                a blob, by digest alone: the same bytes from
                                 two registries are fetched and stored once
``manifest:<registry>/<digest>`` a manifest, per registry (its repository
                                 names are the registry's own)
``tag:<registry>/<name>:<tag>``  the check of a tag against the upstream
===============================  =============================================
"""

from __future__ import annotations


def blob_lease(digest: str) -> str:
    return f"blob:{digest}"


def manifest_lease(registry: str, digest: str) -> str:
    return f"manifest:{registry}/{digest}"


def tag_lease(registry: str, repository: str, tag: str) -> str:
    return f"tag:{registry}/{repository}:{tag}"
