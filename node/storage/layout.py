"""Every path a node writes under its cache directory, built in one place.

::

    <cache.dir>/
      blobs/<algorithm>/<hex[:2]>/<hex>          complete, verified content
      blobs/<algorithm>/<hex[:2]>/<hex>.type     the media type of a manifest
      repos/<registry>/<name>/_repo              the repository has served a manifest
      repos/<registry>/<name>/_tags/<tag>.json   a tag pointer (digest, media type, size, checked_at)
      repos/<registry>/<name>/_tags.json         the last whole tag list the upstream sent
      repos/<registry>/<name>/_bound/<algorithm>-<hex>   a node on its own: the digest is
                                                 confirmed for the repository until the
                                                 time it holds (``node.storage.ledger``)
      fills/<algorithm>-<hex>.lock               flock: the one fill (or manifest fetch) of a digest;
                                                 removed by its holder when it lets go
      fills/<algorithm>-<hex>.json               a fill's state: size, partial file, origin
      fills/<algorithm>-<hex>.<token>.partial    a fill's bytes so far; read-only once verified
      fills/tag-<sha256(name:tag)>.lock          flock: the one check of a tag; removed likewise
      fills/slot-<n>.lock                        flock: fill slot n of cache.max_fills, and the
                                                 bytes its fill will write (``slots.py``)
      fills/<hex>.<random>.put                   a small verified file on its way into blobs/
      fills/cluster.lock                         flock: the worker on heartbeat duty
      fills/unannounced                          content arrived that the coordinator has not heard of
      fills/coordinator-<sha256(address)[:16]>.down   until when a worker found that coordinator down
      sweep.lock                                 flock: the worker sweeping the store
      removals                                   removal stamps, mapped by every worker (``removals.py``)
      budget/<registry>.json                     while tag checks of an upstream pause (``node.budget``)
      metrics.json, metrics.json.lock            a node on its own: its workers' counters

Files written atomically (``files.write_atomic``) pass through a hidden
``.<random>.tmp`` in the folder of their destination; what a crashed writer
leaves of these, of ``.put`` files and of fills is removed at start and by
the sweep (``node.storage.stale``). Nothing is written
outside these paths: names and digests are validated before they get here
(``node.reference``), and every component below is one of theirs.
"""

from __future__ import annotations

import hashlib
import os

from node.reference import Digest

TYPE_SUFFIX = ".type"
PARTIAL_SUFFIX = ".partial"
# The folders of a repository's tag pointers and (a node alone) its confirmations.
TAGS = "_tags"
BINDINGS = "_bound"


class Layout:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blobs = os.path.join(self.root, "blobs")
        self.repos = os.path.join(self.root, "repos")
        self.fills = os.path.join(self.root, "fills")
        self.budgets = os.path.join(self.root, "budget")

    def create(self) -> None:
        for folder in (self.blobs, self.repos, self.fills, self.budgets):
            os.makedirs(folder, exist_ok=True)

    # Content.

    def content(self, digest: Digest) -> str:
        return os.path.join(self.blobs, digest.algorithm, digest.hex[:2], digest.hex)

    def media_type(self, digest: Digest) -> str:
        return self.content(digest) + TYPE_SUFFIX

    # Repositories and tags; ``name`` is scoped by registry (``docker.io/library/alpine``).

    def repository(self, name: str) -> str:
        return os.path.join(self.repos, name)

    def repository_marker(self, name: str) -> str:
        return os.path.join(self.repos, name, "_repo")

    def tag_pointers(self, name: str) -> str:
        return os.path.join(self.repos, name, TAGS)

    def tag_pointer(self, name: str, tag: str) -> str:
        return os.path.join(self.tag_pointers(name), f"{tag}.json")

    def tag_list(self, name: str) -> str:
        return os.path.join(self.repos, name, "_tags.json")

    def bindings(self, name: str) -> str:
        return os.path.join(self.repos, name, BINDINGS)

    def binding(self, name: str, digest: Digest) -> str:
        return os.path.join(self.bindings(name), f"{digest.algorithm}-{digest.hex}")

    # Fills and the locks between a node's workers.

    def fill_base(self, digest: Digest) -> str:
        """The fill files' common prefix; ``fill_state`` and ``fill_partial`` extend it."""
        return os.path.join(self.fills, f"{digest.algorithm}-{digest.hex}")

    def fill_lock(self, digest: Digest) -> str:
        return self.fill_base(digest) + ".lock"

    def fill_state(self, digest: Digest) -> str:
        return self.fill_base(digest) + ".json"

    def fill_partial(self, digest: Digest, token: str) -> str:
        return f"{self.fill_base(digest)}.{token}{PARTIAL_SUFFIX}"

    def fill_slot(self, number: int) -> str:
        return os.path.join(self.fills, f"slot-{number}.lock")

    def manifest_lock(self, digest: Digest) -> str:
        return self.fill_lock(digest)

    def tag_lock(self, name: str, tag: str) -> str:
        key = hashlib.sha256(f"{name}:{tag}".encode()).hexdigest()
        return os.path.join(self.fills, f"tag-{key}.lock")

    def put_prefix(self, digest: Digest) -> str:
        """Where ``put`` writes a small verified file first (``<prefix><random>.put``)."""
        return f"{digest.hex}."

    def duty_lock(self) -> str:
        return os.path.join(self.fills, "cluster.lock")

    def unannounced(self) -> str:
        return os.path.join(self.fills, "unannounced")

    def coordinator_down(self, key: str) -> str:
        """A coordinator address found down by a worker (``node.breaker.Marks``); ``key`` is hex."""
        return os.path.join(self.fills, f"coordinator-{key}.down")

    def sweep_lock(self) -> str:
        return os.path.join(self.root, "sweep.lock")

    def removals(self) -> str:
        return os.path.join(self.root, "removals")

    def budget(self, registry: str) -> str:
        """The pause of one upstream's tag checks; ``registry`` is a validated registry name."""
        return os.path.join(self.budgets, f"{registry}.json")

    def metrics(self) -> str:
        return os.path.join(self.root, "metrics.json")
