"""Value types both sides of the coordinator contract use, defined once.

The node's coordinator client and the coordinator's servicer turn these
into and out of the generated messages; everything else on either side
sees only these. Times are Unix seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

# How far apart the clocks of the nodes and Redis may be (seconds): a tag
# pointer stamped further in the future than this is stale, never fresh.
CLOCK_SKEW = 5.0


@dataclass(frozen=True)
class Holder:
    """A live node, as other nodes reach it (``url`` is empty once its membership expired)."""

    node_id: str
    url: str


@dataclass(frozen=True)
class Content:
    """Complete content on a node. ``accessed_at`` only matters in announcements."""

    digest: str
    size: int = 0
    media_type: str = ""
    accessed_at: float = 0.0


@dataclass(frozen=True)
class TagPointer:
    """Where a tag pointed when it was last checked against the upstream."""

    digest: str
    media_type: str = ""
    size: int = 0
    checked_at: float = 0.0

    def fresh(self, now: float, tag_ttl: float) -> bool:
        """Checked less than ``tag_ttl`` seconds before ``now``.

        A check more than ``CLOCK_SKEW`` after ``now`` cannot have happened:
        such a pointer is stale, not fresh for as long as its future lasts.
        """
        age = now - self.checked_at
        return -CLOCK_SKEW <= age < tag_ttl
