"""Publishing generated images to the benchmark's upstream.

Every image is built from a seed and never reused: a scenario that needs a
cold cache pushes fresh content, so every system it measures starts cold
without being restarted. Images come from the test bed's builder with
uncompressed layers (``testbed/images.py`` says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.settings import Sizes
from testbed.images import OCI_MANIFEST, build_image, push, sha256_digest

TAG = "latest"


@dataclass(frozen=True)
class Published:
    """An image in the upstream: what a pull fetches, without the bytes."""

    repository: str
    tag: str
    manifest: bytes
    # (digest, size) of the config and every layer, in manifest order.
    blobs: tuple[tuple[str, int], ...]

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        """Bytes a full pull transfers: the manifest and every blob."""
        return len(self.manifest) + sum(size for _, size in self.blobs)

    @property
    def largest_blob(self) -> tuple[str, int]:
        return max(self.blobs, key=lambda blob: blob[1])


def layer_sizes(kind: str, sizes: Sizes) -> tuple[int, ...]:
    """The layers of an image kind: ``small``, ``many``, ``large``, or ``one:<bytes>``."""
    if kind == "small":
        return sizes.small_layers
    if kind == "many":
        return (sizes.many_layer_size,) * sizes.many_layers
    if kind == "large":
        return (sizes.large_layer,)
    if kind.startswith("one:"):
        return (int(kind[4:]),)
    raise ValueError(f"unknown image kind {kind!r}")


class Publisher:
    """Pushes fresh images to the upstream registry."""

    def __init__(self, registry_url: str) -> None:
        self.base = registry_url.rstrip("/")
        self._client = httpx.Client(timeout=120.0)

    def publish(self, repository: str, layer_sizes: Sequence[int], seed: str) -> Published:
        image = build_image(layer_sizes, oci=True, seed=f"{repository}/{seed}", compressed=False)
        # No HEAD before each blob: the upstream's log would count it as a pull.
        push(self.base, repository, TAG, image, client=self._client, skip_present=False)
        blobs = tuple((digest, len(data)) for digest, data in image.blobs.items())
        return Published(repository, TAG, image.manifest, blobs)

    def copy(self, image: Published, repository: str) -> Published:
        """The same image in another repository, its blobs mounted rather than uploaded again.

        The copy shares its content with the original: only systems that do
        not share a cache may pull both cold.
        """
        for digest, _ in image.blobs:
            mounted = self._client.post(
                f"{self.base}/v2/{repository}/blobs/uploads/", params={"mount": digest, "from": image.repository}
            )
            _expect(mounted, 201)
        response = self._client.put(
            f"{self.base}/v2/{repository}/manifests/{TAG}",
            content=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        _expect(response, 201)
        return Published(repository, TAG, image.manifest, image.blobs)

    def close(self) -> None:
        self._client.close()


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} answered {response.status_code}, "
            f"expected {status}: {response.text[:300]}"
        )
