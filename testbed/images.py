"""Real, deterministic container images built in memory, and pushing them to a registry.

Layers are genuine tar archives, gzip-compressed unless asked otherwise, and
configs carry the ``rootfs.diff_ids`` of the uncompressed tars, so real
clients such as skopeo accept the images. The same arguments always give the
same bytes, hence the same digests, which keeps test failures reproducible.

Tests use small compressed layers of random bytes. The benchmark needs
hundreds of MiB in a moment and nothing on its path compresses, so it asks
for uncompressed layers (``compressed=False``), whose content only needs to
be distinct: one random MiB per layer, each copy stamped with its offset.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import struct
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_UNCOMPRESSED = "application/vnd.oci.image.layer.v1.tar"

# Every file and archive gets this modification time so that builds repeat exactly.
_EPOCH = 0
_MiB = 1024 * 1024


def sha256_digest(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of exactly these bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    """One single-platform image: its manifest, config and layers as the registry stores them."""

    manifest: bytes
    media_type: str
    digest: str
    config: bytes
    config_digest: str
    layers: list[bytes]
    layer_digests: list[str]
    # Every blob by digest: the config and the layers.
    blobs: dict[str, bytes] = field(repr=False)
    platform: str = "linux/amd64"

    @property
    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """Every manifest by digest, with its media type; for an image just its own."""
        return {self.digest: (self.media_type, self.manifest)}


@dataclass(frozen=True)
class Index:
    """A multi-platform image: an OCI image index or a Docker manifest list, and its children."""

    manifest: bytes
    media_type: str
    digest: str
    # The child images by platform string, e.g. "linux/arm64".
    children: dict[str, Image]

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob of every child, by digest."""
        merged: dict[str, bytes] = {}
        for child in self.children.values():
            merged.update(child.blobs)
        return merged

    @property
    def manifests(self) -> dict[str, tuple[str, bytes]]:
        """Every manifest by digest, with its media type: the children and the index itself."""
        merged = {child.digest: (child.media_type, child.manifest) for child in self.children.values()}
        merged[self.digest] = (self.media_type, self.manifest)
        return merged


def make_layer(files: Mapping[str, bytes]) -> bytes:
    """Return a gzip-compressed tar archive holding ``files`` (path -> content), deterministically."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(files):
            content = files[path]
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mtime = _EPOCH
            info.mode = 0o644
            info.uname = info.gname = "root"
            archive.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=_EPOCH)


def random_layer(size: int, seed: int | str = 0) -> bytes:
    """Return a layer with one file of ``size`` pseudo-random bytes.

    Random content does not compress, so the blob is a little larger than
    ``size``: tests can ask for a blob size and get about that.
    """
    content = random.Random(f"layer/{seed}").randbytes(size)
    return make_layer({f"data/{seed}.bin": content})


def stamped_layer(size: int, seed: int | str = 0) -> bytes:
    """Return an uncompressed layer with one file of ``size`` bytes, distinct for every seed, fast.

    One random MiB is repeated, and every copy starts with the seed's stamp
    and its own offset, so no two MiB of any two layers are alike.
    """
    block = memoryview(random.Random(f"layer/{seed}").randbytes(_MiB))
    stamp = hashlib.sha256(str(seed).encode()).digest()[:8]
    info = tarfile.TarInfo(f"data/{hashlib.sha256(str(seed).encode()).hexdigest()[:16]}.bin")
    info.size = size
    info.mtime = _EPOCH
    info.mode = 0o644
    info.uname = info.gname = "root"
    pieces: list[bytes | memoryview] = [info.tobuf(format=tarfile.PAX_FORMAT)]
    for offset in range(0, size, _MiB):
        length = min(_MiB, size - offset)
        pieces += [(stamp + struct.pack(">Q", offset))[:length], block[16:length]]
    # The file is padded to a whole block, then come the two empty blocks
    # that end an archive, then padding to a whole record, as tarfile writes.
    written = sum(len(piece) for piece in pieces) + -size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
    pieces.append(b"\0" * (-size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE + -written % tarfile.RECORDSIZE))
    return b"".join(pieces)


def _platform_parts(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"platform must be os/arch or os/arch/variant, not {platform!r}")
    described = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        described["variant"] = parts[2]
    return described


def _encode(document: dict[str, Any]) -> bytes:
    # Indented like the documents real tools push; the exact bytes define the digest.
    return json.dumps(document, indent=3).encode()


def build_image(
    layer_sizes: Sequence[int],
    *,
    oci: bool = False,
    seed: int | str = 0,
    platform: str = "linux/amd64",
    compressed: bool = True,
) -> Image:
    """Build an image with one layer per size, for ``platform`` (``os/arch[/variant]``).

    The manifest is a Docker schema 2 manifest, or an OCI image manifest when
    ``oci`` is true. Layers are ``random_layer``s, or with ``compressed=False``
    ``stamped_layer``s, which only an OCI image can list. Images built with
    different seeds share no blobs.
    """
    if not compressed and not oci:
        raise ValueError("uncompressed layers need an OCI manifest")
    seeds = [f"{seed}/{platform}/{index}" for index in range(len(layer_sizes))]
    if compressed:
        layers = [random_layer(size, seed=layer_seed) for size, layer_seed in zip(layer_sizes, seeds, strict=True)]
        layer_digests = [sha256_digest(layer) for layer in layers]
        diff_ids = [sha256_digest(gzip.decompress(layer)) for layer in layers]
    else:
        layers = [stamped_layer(size, seed=layer_seed) for size, layer_seed in zip(layer_sizes, seeds, strict=True)]
        # An uncompressed layer is its own diff.
        layer_digests = diff_ids = [sha256_digest(layer) for layer in layers]
    config = _encode(
        {
            **_platform_parts(platform),
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "shoal tests"} for _ in layers],
        }
    )
    config_digest = sha256_digest(config)
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    layer_type = (OCI_LAYER if compressed else OCI_LAYER_UNCOMPRESSED) if oci else DOCKER_LAYER
    manifest = _encode(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                "size": len(config),
                "digest": config_digest,
            },
            "layers": [
                {"mediaType": layer_type, "size": len(layer), "digest": digest}
                for layer, digest in zip(layers, layer_digests, strict=True)
            ],
        }
    )
    blobs = {config_digest: config, **dict(zip(layer_digests, layers, strict=True))}
    return Image(
        manifest=manifest,
        media_type=media_type,
        digest=sha256_digest(manifest),
        config=config,
        config_digest=config_digest,
        layers=layers,
        layer_digests=layer_digests,
        blobs=blobs,
        platform=platform,
    )


def build_index(images_by_platform: Mapping[str, Image], *, oci: bool = True) -> Index:
    """Build an OCI image index (or, with ``oci=False``, a Docker manifest list) over these images.

    Each image must have been built for the platform it is listed under, so
    that the index and the image configs agree, as clients check.
    """
    for platform, image in images_by_platform.items():
        if image.platform != platform:
            raise ValueError(f"image built for {image.platform} listed under {platform}")
    media_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    manifest = _encode(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": image.media_type,
                    "size": len(image.manifest),
                    "digest": image.digest,
                    "platform": _platform_parts(platform),
                }
                for platform, image in images_by_platform.items()
            ],
        }
    )
    return Index(
        manifest=manifest,
        media_type=media_type,
        digest=sha256_digest(manifest),
        children=dict(images_by_platform),
    )


def build_multiarch(
    layer_sizes: Sequence[int],
    platforms: tuple[str, ...] = ("linux/amd64", "linux/arm64"),
    *,
    oci: bool = True,
    seed: int | str = 0,
) -> Index:
    """Build one image per platform (no shared blobs) and an index over them."""
    images = {platform: build_image(layer_sizes, oci=oci, seed=seed, platform=platform) for platform in platforms}
    return build_index(images, oci=oci)


def push(
    registry_url: str,
    name: str,
    tag: str,
    image: Image | Index,
    *,
    client: httpx.Client | None = None,
    skip_present: bool = True,
) -> str:
    """Push ``image`` to ``registry_url`` as ``name:tag`` through the registry HTTP API.

    Blobs go up first (monolithic uploads), then the children of an index by
    digest, then the top manifest by tag, as the registry refuses manifests
    that reference content it does not have. With ``skip_present`` a HEAD
    asks for each blob first and a blob the registry has is not sent again;
    the benchmark turns that off, as it counts every HEAD at its upstream as
    a pull. Returns the digest of the manifest pushed under the tag.
    """
    owned = client is None
    http = client if client is not None else httpx.Client(timeout=60.0)
    try:
        base = registry_url.rstrip("/")
        for digest, data in image.blobs.items():
            if not (skip_present and http.head(f"{base}/v2/{name}/blobs/{digest}").status_code == 200):
                _push_blob(http, base, name, digest, data)
        children = image.children.values() if isinstance(image, Index) else ()
        for child in children:
            _push_manifest(http, base, name, child.digest, child.media_type, child.manifest)
        _push_manifest(http, base, name, tag, image.media_type, image.manifest)
        return image.digest
    finally:
        if owned:
            http.close()


def _push_blob(http: httpx.Client, base: str, name: str, digest: str, data: bytes) -> None:
    started = http.post(f"{base}/v2/{name}/blobs/uploads/")
    _expect(started, 202, f"starting upload of {digest}")
    # The Location may be relative and already carries state in its query
    # string, so resolve it and add the digest rather than appending text.
    location = httpx.URL(urljoin(f"{base}/", started.headers["Location"]))
    finished = http.put(
        location.copy_merge_params({"digest": digest}),
        content=_pieces(data),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    )
    _expect(finished, 201, f"finishing upload of {digest}")


def _pieces(data: bytes) -> Iterator[bytes]:
    # httpcore sends one large buffer by slicing off what each send() took,
    # which copies the rest every time; MiB pieces keep a large blob cheap.
    for start in range(0, len(data), _MiB):
        yield data[start : start + _MiB]


def _push_manifest(http: httpx.Client, base: str, name: str, reference: str, media_type: str, data: bytes) -> None:
    response = http.put(f"{base}/v2/{name}/manifests/{reference}", content=data, headers={"Content-Type": media_type})
    _expect(response, 201, f"pushing manifest {name}:{reference}")
    pushed = response.headers.get("Docker-Content-Digest")
    if pushed is not None and pushed != sha256_digest(data):
        raise RuntimeError(f"registry stored {name}:{reference} as {pushed}, expected {sha256_digest(data)}")


def _expect(response: httpx.Response, status: int, doing: str) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{doing}: {response.request.method} {response.request.url} answered "
            f"{response.status_code}, expected {status}: {response.text[:500]}"
        )
