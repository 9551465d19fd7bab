"""What ``shoal warm`` fetches for one image: its reference, and the plan of manifests and blobs.

``parse_reference`` reads ``[registry/]name[:tag][@digest]`` as Docker does,
with the grammar of ``node/reference.py``. ``Planner.plan`` reads the image's
manifest and, for an index or manifest list, each child manifest (those of
the platforms asked for, else all), and lists every blob they name, configs
and layers, each once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from node.reference import DIGEST, NAME, TAG
from shoal.errors import WarmError

# A host name or [IPv6 address], and a port: what Docker takes for a registry.
_REGISTRY = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")
# Docker Hub's other names; containerd calls it docker.io.
_DOCKER_HUB = {"index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Reference:
    """An image reference: the registry it names (None: the cluster's default), the name, a tag or digest."""

    text: str
    registry: str | None
    name: str
    reference: str

    @property
    def params(self) -> dict[str, str]:
        """Query parameters of every request for this image: containerd's ``ns``."""
        return {"ns": self.registry} if self.registry else {}


def parse_reference(text: str) -> Reference:
    """Parse ``[registry/]name[:tag][@digest]``; a missing tag is ``latest``, a digest wins over a tag."""
    rest, _, digest = text.strip().partition("@")
    tag = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    registry = None
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, rest = first, remainder
        if not _REGISTRY.fullmatch(registry):
            raise WarmError(f"{text!r}: invalid registry {registry!r}")
        if registry in _DOCKER_HUB:
            registry = "docker.io"
    if not rest or not NAME.fullmatch(rest):
        raise WarmError(f"{text!r} is not an image reference (name:tag or name@sha256:...)")
    if tag is not None and not TAG.fullmatch(tag):
        raise WarmError(f"{text!r}: invalid tag {tag!r}")
    if digest and not DIGEST.fullmatch(digest):
        raise WarmError(f"{text!r}: invalid digest {digest!r}")
    return Reference(text=text, registry=registry, name=rest, reference=digest or tag or "latest")


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    is_layer: bool


@dataclass
class Plan:
    """Everything one image consists of: its manifests (already fetched) and the blobs to fetch.

    Every digest in ``blobs`` matches the digest grammar.
    """

    manifests: int = 0
    blobs: dict[str, Blob] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return sum(1 for blob in self.blobs.values() if blob.is_layer)

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs.values())


class Manifests(Protocol):
    """Where a planner reads manifests (``shoal.warm_client.RegistryClient``).

    ``manifest`` returns the media type and the manifest as a JSON object,
    its bytes checked against ``reference`` when that is a digest, or raises
    ``WarmError`` saying why it cannot.
    """

    def manifest(self, ref: Reference, reference: str) -> tuple[str, dict[str, Any]]: ...


class Planner:
    """Plans images from one source of manifests, for the platforms asked for (none: every platform)."""

    def __init__(self, manifests: Manifests, platforms: Sequence[str] | None = None) -> None:
        self.manifests = manifests
        self.platforms = list(platforms or [])

    def plan(self, ref: Reference) -> Plan:
        """Fetch the manifest, and the children of an index, and list the blobs."""
        plan = Plan()
        media_type, document = self.manifests.manifest(ref, ref.reference)
        plan.manifests += 1
        if "manifests" in document:
            self._plan_index(ref, document, plan, depth=0)
        else:
            self._plan_image(document, media_type, plan)
        return plan

    def _plan_index(self, ref: Reference, index: dict[str, Any], plan: Plan, depth: int) -> None:
        children = [entry for entry in index.get("manifests") or [] if isinstance(entry, dict)]
        if self.platforms:
            offered = sorted({platform for entry in children if (platform := _platform_of(entry))})
            children = [entry for entry in children if _matches(_platform_of(entry), self.platforms)]
            if not children and depth == 0:
                raise WarmError(
                    f"no manifest for {', '.join(self.platforms)} (the image has {', '.join(offered) or 'none'})"
                )
        for entry in children:
            digest = str(entry.get("digest", ""))
            if not DIGEST.fullmatch(digest):
                raise WarmError(f"the index lists an invalid digest {digest!r}")
            media_type, document = self.manifests.manifest(ref, digest)
            plan.manifests += 1
            if "manifests" in document:
                # An index in an index is rare; deeper than two levels is a loop or a mistake.
                if depth < 2:
                    self._plan_index(ref, document, plan, depth + 1)
                continue
            platform = _platform_of(entry)
            if platform:
                plan.platforms.append(platform)
            self._plan_image(document, media_type, plan)

    @staticmethod
    def _plan_image(document: dict[str, Any], media_type: str, plan: Plan) -> None:
        if "layers" not in document and "config" not in document:
            raise WarmError(f"unsupported manifest type {media_type or 'without a media type'}")
        descriptors = [(document.get("config"), False)] + [(layer, True) for layer in document.get("layers") or []]
        for descriptor, is_layer in descriptors:
            if not isinstance(descriptor, dict) or not descriptor.get("digest"):
                continue
            # Foreign (non-distributable) layers live at their own URLs, not in any registry.
            if descriptor.get("urls") and "foreign" in str(descriptor.get("mediaType", "")):
                continue
            digest = str(descriptor["digest"])
            if not DIGEST.fullmatch(digest):
                raise WarmError(f"the manifest lists an invalid digest {digest!r}")
            size = descriptor.get("size")
            plan.blobs.setdefault(digest, Blob(digest, int(size) if isinstance(size, int) else 0, is_layer))


def _platform_of(descriptor: dict[str, Any]) -> str | None:
    platform = descriptor.get("platform")
    if not isinstance(platform, dict) or not platform.get("os") or not platform.get("architecture"):
        return None
    parts = [str(platform["os"]), str(platform["architecture"])]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _matches(platform: str | None, wanted: list[str]) -> bool:
    """An index entry for os/arch/variant matches os/arch/variant exactly, and os/arch."""
    if platform is None:
        return False
    for want in wanted:
        if platform == want or (want.count("/") == 1 and platform.split("/")[:2] == want.split("/")):
            return True
    return False
