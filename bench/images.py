"""Generated images for the benchmark, and pushing them to the upstream.

Every image is built from a seed and never reused: a scenario that needs a
cold cache pushes fresh content, so every system it measures starts cold
without being restarted. Layers are real, uncompressed tar archives
(``application/vnd.oci.image.layer.v1.tar``) so that real clients accept
the images; nothing on the path compresses, so their content only needs to
be distinct, not random: one random MiB per layer, each copy stamped with its
index, builds hundreds of MiB in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from bench.settings import MiB, Sizes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
TAG = "latest"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Built:
    """An image in memory, ready to push."""

    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


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
        return digest_of(self.manifest)

    @property
    def size(self) -> int:
        """Bytes a full pull transfers: the manifest and every blob."""
        return len(self.manifest) + sum(size for _, size in self.blobs)

    @property
    def largest_blob(self) -> tuple[str, int]:
        return max(self.blobs, key=lambda blob: blob[1])


def layer(size: int, seed: str) -> bytes:
    """A tar archive holding one file of ``size`` bytes, distinct for every seed."""
    block = memoryview(random.Random(seed).randbytes(MiB))
    stamp = hashlib.sha256(seed.encode()).digest()[:8]
    info = tarfile.TarInfo(f"data/{hashlib.sha256(seed.encode()).hexdigest()[:16]}.bin")
    info.size = size
    info.mode = 0o644
    info.uname = info.gname = "root"
    pieces: list[bytes | memoryview] = [info.tobuf(format=tarfile.PAX_FORMAT)]
    for index in range(0, size, MiB):
        length = min(MiB, size - index)
        # Every MiB starts with the seed's stamp and its own offset.
        pieces += [(stamp + struct.pack(">Q", index))[:length], block[16:length]]
    length = sum(len(piece) for piece in pieces) + 2 * tarfile.BLOCKSIZE
    length += -size % tarfile.BLOCKSIZE
    pieces.append(b"\0" * (-size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE + (-length % tarfile.RECORDSIZE)))
    return b"".join(pieces)


def build(layer_sizes: Sequence[int], seed: str) -> Built:
    """An OCI image with one layer per size; a different seed shares no blob."""
    layers = [layer(size, f"{seed}/{index}") for index, size in enumerate(layer_sizes)]
    layer_digests = [digest_of(data) for data in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": [f"SEED={seed}"]},
            # Uncompressed layers: the diff id is the layer's own digest.
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
        },
        indent=2,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": digest_of(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "size": len(data), "digest": digest}
                for data, digest in zip(layers, layer_digests, strict=True)
            ],
        },
        indent=2,
    ).encode()
    blobs = {digest_of(config): config, **dict(zip(layer_digests, layers, strict=True))}
    return Built(manifest, blobs)


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
        built = build(layer_sizes, f"{repository}/{seed}")
        for digest, data in built.blobs.items():
            self._push_blob(repository, digest, data)
        response = self._client.put(
            f"{self.base}/v2/{repository}/manifests/{TAG}",
            content=built.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        _expect(response, 201)
        return Published(repository, TAG, built.manifest, tuple((d, len(data)) for d, data in built.blobs.items()))

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

    def _push_blob(self, repository: str, digest: str, data: bytes) -> None:
        started = self._client.post(f"{self.base}/v2/{repository}/blobs/uploads/")
        _expect(started, 202)
        location = httpx.URL(urljoin(f"{self.base}/", started.headers["Location"]))
        finished = self._client.put(
            location.copy_merge_params({"digest": digest}),
            # In pieces: httpcore sends one large buffer by slicing off what
            # each send() took, which copies the rest every time.
            content=(data[start : start + MiB] for start in range(0, len(data), MiB)),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        )
        _expect(finished, 201)

    def close(self) -> None:
        self._client.close()


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} answered {response.status_code}, "
            f"expected {status}: {response.text[:300]}"
        )
