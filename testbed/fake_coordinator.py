"""An in-memory coordinator for unit tests, typed against ``node.coordinator_client.Coordinator``.

It keeps what the real one keeps in Redis, without expiry: members, who
holds which digest, leases with their tokens, tag pointers, confirmed
bindings. Several nodes
share one ``FakeDirectory``; each talks to it through its own
``FakeCoordinator`` (the coordinator knows the caller by its node id).

Fault injection: ``down`` makes every call raise ``CoordinatorUnavailable``;
``before`` is called with the method's name before every call, so a test can
change the directory at an exact point of a node's conversation (another
node completing its fetch between a look and a lease, say).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from node.coordinator_client import Claim, Coordinator, CoordinatorUnavailable, Lease, LeaseLost, Location
from protos.leases import tag_lease
from protos.values import Content, Holder, TagPointer


@dataclass
class _Lease:
    node_id: str
    token: str
    fence: int


@dataclass
class FakeDirectory:
    urls: dict[str, str] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)
    content: dict[str, Content] = field(default_factory=dict)
    leases: dict[str, _Lease] = field(default_factory=dict)
    # The failure each lease key's latest fetch was given up with, until the key is granted again.
    failures: dict[str, str] = field(default_factory=dict)
    tags: dict[tuple[str, str, str], TagPointer] = field(default_factory=dict)
    # Confirmed (upstream, repository, digest) pairs and their TTL in ms (0: never expires); no expiry here.
    bindings: dict[tuple[str, str, str], int] = field(default_factory=dict)
    down: bool = False
    # Every call, in order: (node id, method, first argument).
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    before: Callable[[str], None] | None = None
    _fences: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def holder(self, node_id: str) -> Holder:
        """The node as others reach it; a node never seen gets an address of its own name."""
        return Holder(node_id, self.urls.get(node_id, f"http://{node_id}.test"))

    def hold(self, node_id: str, content: Content) -> None:
        """Record that ``node_id`` holds ``content`` completely."""
        self.holders.setdefault(content.digest, set()).add(node_id)
        self.content[content.digest] = content

    def grant(self, key: str, node_id: str) -> str:
        """Give ``key``'s lease to ``node_id``; returns its token."""
        fence = next(self._fences)
        token = f"{node_id}-{fence}"
        self.leases[key] = _Lease(node_id, token, fence)
        self.failures.pop(key, None)
        return token


class FakeCoordinator:
    def __init__(self, directory: FakeDirectory, node_id: str, url: str = "") -> None:
        self.directory = directory
        self.node_id = node_id
        directory.urls.setdefault(node_id, url or directory.holder(node_id).url)
        self.closed = False

    def _call(self, method: str, argument: object = "") -> None:
        directory = self.directory
        directory.calls.append((self.node_id, method, str(argument)))
        if directory.before is not None:
            directory.before(method)
        if directory.down:
            raise CoordinatorUnavailable(f"{method}: no coordinator answered")

    def calls(self, method: str) -> list[str]:
        """The first arguments of this node's calls of ``method``."""
        return [argument for node, name, argument in self.directory.calls if node == self.node_id and name == method]

    # Membership.

    def register(self, url: str, *, capacity_bytes: int = 0, used_bytes: int = 0) -> float:
        self._call("register", url)
        self.directory.urls[self.node_id] = url
        return 30.0

    def heartbeat(self, url: str, *, capacity_bytes: int = 0, used_bytes: int = 0) -> tuple[bool, list[str]]:
        self._call("heartbeat", url)
        return self.node_id in self.directory.urls, []

    def announce_inventory(self, content: Iterable[Content], *, ttl_ms: int | None = None) -> list[str]:
        self._call("announce_inventory")
        for holders in self.directory.holders.values():
            holders.discard(self.node_id)
        for item in content:
            self.directory.hold(self.node_id, item)
        return []

    def add_content(self, content: Iterable[Content], *, ttl_ms: int | None = None) -> list[str]:
        items = list(content)
        self._call("add_content", ",".join(item.digest for item in items))
        for item in items:
            self.directory.hold(self.node_id, item)
        return []

    def drop_content(self, digests: Iterable[str]) -> None:
        digests = list(digests)
        self._call("drop_content", ",".join(digests))
        for digest in digests:
            self.directory.holders.get(digest, set()).discard(self.node_id)

    def report_bad_copy(self, holder_id: str, digest: str) -> bool:
        self._call("report_bad_copy", f"{holder_id} {digest}")
        holders = self.directory.holders.get(digest, set())
        listed = holder_id in holders
        holders.discard(holder_id)
        return listed

    # Content and leases.

    def locate(self, digest: str, lease_key: str = "") -> Location:
        self._call("locate", digest)
        directory = self.directory
        holders = [directory.holder(node) for node in sorted(directory.holders.get(digest, set()))]
        lease = directory.leases.get(lease_key)
        fetcher = directory.holder(lease.node_id) if lease is not None else None
        failure = directory.failures.get(lease_key, "") if lease is None else ""
        return Location(holders, fetcher, lease is not None, directory.content.get(digest), failure)

    def claim(self, digest: str, key: str, ttl_ms: int) -> Claim:
        self._call("claim", digest)
        directory = self.directory
        holders = [directory.holder(node) for node in sorted(directory.holders.get(digest, set()))]
        return Claim(holders, None) if holders else Claim([], self._acquire(key))

    def acquire_lease(self, key: str, ttl_ms: int) -> Lease:
        self._call("acquire_lease", key)
        return self._acquire(key)

    def _acquire(self, key: str) -> Lease:
        lease = self.directory.leases.get(key)
        if lease is not None and lease.node_id != self.node_id:
            return Lease(False, "", lease.fence, self.directory.holder(lease.node_id))
        token = self.directory.grant(key, self.node_id)
        return Lease(True, token, self.directory.leases[key].fence, None)

    def renew_lease(self, key: str, token: str, ttl_ms: int) -> bool:
        self._call("renew_lease", key)
        lease = self.directory.leases.get(key)
        return lease is not None and lease.token == token

    def complete_fetch(self, key: str, token: str, digest: str, size: int, media_type: str, ttl_ms: int) -> None:
        self._call("complete_fetch", key)
        lease = self.directory.leases.get(key)
        if lease is None or lease.token != token:
            raise LeaseLost("the lease is held under another token", "FAILED_PRECONDITION")
        del self.directory.leases[key]
        self.directory.hold(self.node_id, Content(digest, size, media_type))

    def abort_fetch(self, key: str, token: str, failure: str = "") -> None:
        self._call("abort_fetch", key)
        lease = self.directory.leases.get(key)
        if lease is not None and lease.token == token:
            del self.directory.leases[key]
            if failure:
                self.directory.failures[key] = failure

    def touch(self, digests: Iterable[str]) -> None:
        self._call("touch", ",".join(digests))

    # Tags.

    def get_tag(self, upstream: str, repository: str, tag: str) -> TagPointer | None:
        self._call("get_tag", f"{repository}:{tag}")
        return self.directory.tags.get((upstream, repository, tag))

    def put_tag(
        self, upstream: str, repository: str, tag: str, pointer: TagPointer, lease_token: str, *, release: bool = False
    ) -> None:
        self._call("put_tag", f"{repository}:{tag}")
        key = tag_lease(upstream, repository, tag)
        lease = self.directory.leases.get(key)
        if lease is None or lease.token != lease_token:
            raise LeaseLost("the lease is held under another token", "FAILED_PRECONDITION")
        self.directory.tags[(upstream, repository, tag)] = pointer
        if release:
            del self.directory.leases[key]

    # Content bound to its repository.

    def confirm_bindings(self, upstream: str, repository: str, digests: list[str], ttl_ms: int) -> None:
        self._call("confirm_bindings", f"{repository}@{','.join(digests)}")
        for digest in digests:
            self.directory.bindings[(upstream, repository, digest)] = ttl_ms

    def get_bindings(self, upstream: str, repository: str, digests: list[str]) -> dict[str, int]:
        self._call("get_bindings", f"{repository}@{','.join(digests)}")
        bindings = self.directory.bindings
        return {
            digest: bindings[(upstream, repository, digest)]
            for digest in digests
            if (upstream, repository, digest) in bindings
        }

    def close(self) -> None:
        self.closed = True


# The fake answers everything the node asks of the real one.
_: type[Coordinator] = FakeCoordinator
