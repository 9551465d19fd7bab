"""The registry API of a real node (gunicorn) in front of a real upstream."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testbed.images import Image, Index, build_image, build_multiarch, push
from testbed.node import NodeProcess
from testbed.processes import wait_until
from testbed.registry import DistributionRegistry
from testbed.skopeo import skopeo_copy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image(upstream_registry: DistributionRegistry) -> Image:
    built = build_image([300_000, 2_500_000, 40_000], seed="api")
    push(upstream_registry.url, "api/app", "v1", built)
    return built


@pytest.fixture(scope="module")
def index(upstream_registry: DistributionRegistry) -> Index:
    built = build_multiarch([50_000, 70_000], seed="api-multi")
    push(upstream_registry.url, "api/multi", "v1", built)
    return built


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, upstream_registry: DistributionRegistry) -> Iterator[NodeProcess]:
    started = NodeProcess(tmp_path_factory.mktemp("api-node"), upstream_registry.url)
    yield started
    started.stop()


@pytest.fixture
def client(node: NodeProcess) -> Iterator[httpx.Client]:
    with node.client() as http:
        yield http


def test_base_endpoint(client: httpx.Client) -> None:
    for method in ("GET", "HEAD"):
        response = client.request(method, "/v2/")
        assert response.status_code == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_pull_by_tag_and_digest_matches_upstream(client: httpx.Client, image: Image) -> None:
    by_tag = client.get("/v2/api/app/manifests/v1")
    assert by_tag.status_code == 200
    assert by_tag.content == image.manifest
    assert by_tag.headers["Content-Type"] == image.media_type
    assert by_tag.headers["Docker-Content-Digest"] == image.digest
    assert by_tag.headers["Content-Length"] == str(len(image.manifest))
    assert by_tag.headers["ETag"] == f'"{image.digest}"'
    by_digest = client.get(f"/v2/api/app/manifests/{image.digest}")
    assert by_digest.content == image.manifest
    assert by_digest.headers["Content-Type"] == image.media_type
    for digest, data in image.blobs.items():
        for attempt in ("miss", "hit"):
            response = client.get(f"/v2/api/app/blobs/{digest}")
            assert response.status_code == 200, attempt
            assert response.content == data, attempt
            assert response.headers["Docker-Content-Digest"] == digest
            assert response.headers["Content-Length"] == str(len(data))


def test_index_and_child_manifests(client: httpx.Client, index: Index) -> None:
    response = client.get("/v2/api/multi/manifests/v1")
    assert response.content == index.manifest
    assert response.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
    listed = {entry["digest"] for entry in json.loads(response.content)["manifests"]}
    assert listed == {child.digest for child in index.children.values()}
    for child in index.children.values():
        response = client.get(f"/v2/api/multi/manifests/{child.digest}")
        assert response.content == child.manifest
        assert response.headers["Content-Type"] == child.media_type


def test_head_answers_headers_without_body(client: httpx.Client, image: Image) -> None:
    manifest = client.head("/v2/api/app/manifests/v1")
    assert manifest.status_code == 200
    assert manifest.content == b""
    assert manifest.headers["Docker-Content-Digest"] == image.digest
    assert manifest.headers["Content-Length"] == str(len(image.manifest))
    layer = image.layer_digests[0]
    blob = client.head(f"/v2/api/app/blobs/{layer}")
    assert blob.status_code == 200
    assert blob.headers["Content-Length"] == str(len(image.blobs[layer]))


def test_if_none_match_answers_304_for_this_content(client: httpx.Client, image: Image) -> None:
    layer = image.layer_digests[0]
    for path, digest in (
        (f"/v2/api/app/manifests/{image.digest}", image.digest),
        (f"/v2/api/app/blobs/{layer}", layer),
    ):
        for matching in (f'"{digest}"', f'W/"{digest}"', f'"sha256:{"0" * 64}", "{digest}"', "*"):
            response = client.get(path, headers={"If-None-Match": matching})
            assert response.status_code == 304, (path, matching)
            assert response.content == b""
            assert response.headers["ETag"] == f'"{digest}"'
        for other in (f'"sha256:{"0" * 64}"', f'"x{digest}"'):
            assert client.get(path, headers={"If-None-Match": other}).status_code == 200, (path, other)


def test_ranges_on_miss_and_hit(tmp_path: Path, upstream_registry: DistributionRegistry) -> None:
    built = build_image([600_000], seed="ranges")
    push(upstream_registry.url, "api/ranges", "v1", built)
    layer = built.layer_digests[0]
    data = built.blobs[layer]
    node = NodeProcess(tmp_path, upstream_registry.url)
    try:
        with node.client() as http:
            cases = [
                ("bytes=100-199", 100, 200),
                ("bytes=599000-", 599000, len(data)),
                ("bytes=-10", len(data) - 10, len(data)),
            ]
            for header, start, end in cases:  # The first is a miss, the rest hits.
                response = http.get(f"/v2/api/ranges/blobs/{layer}", headers={"Range": header})
                assert response.status_code == 206, header
                assert response.content == data[start:end], header
                assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
            # One satisfiable range among ranges past the end is that range, as Go's ServeContent has it.
            response = http.get(f"/v2/api/ranges/blobs/{layer}", headers={"Range": "bytes=700000-, 10-19"})
            assert response.status_code == 206
            assert response.content == data[10:20]
            unsatisfiable = [
                "bytes=700000-",
                "bytes=5-2",
                "bytes=abc",
                "bytes=-0",
                "bytes=1 0-20",
                b"bytes=\xc2\xb2-",
                "bytes=0-1,x",
                "bytes=700000-,800000-",
                "bytes=" + "9" * 20 + "-",
                "bytes=" + "9" * 5000,
                "bytes=-" + "9" * 5000,
                "bytes=" + "1" * 5000 + "-",
            ]
            for header in unsatisfiable:
                response = http.get(f"/v2/api/ranges/blobs/{layer}", headers={"Range": header})
                assert response.status_code == 416, header
                assert response.json()["errors"][0]["code"] == "RANGE_INVALID"
                assert response.headers["Content-Range"] == f"bytes */{len(data)}"
            whole = [
                ({"Range": "items=1-2"}),
                # No range in the list at all.
                ({"Range": "bytes="}),
                ({"Range": "bytes=, ,"}),
                # Several ranges: Go sends them as multipart/byteranges, Shoal the whole blob.
                ({"Range": "bytes=0-1,5-6"}),
                # Ranges that add up to more than the blob.
                ({"Range": "bytes=0-,1-"}),
                # A range for another version of the content.
                ({"Range": "bytes=0-9", "If-Range": '"sha256:' + "0" * 64 + '"'}),
                ({"Range": "bytes=0-9", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}),
            ]
            for headers in whole:
                response = http.get(f"/v2/api/ranges/blobs/{layer}", headers=headers)
                assert response.status_code == 200, headers
                assert response.content == data, headers
            matching = http.get(
                f"/v2/api/ranges/blobs/{layer}", headers={"Range": "bytes=0-9", "If-Range": f'"{layer}"'}
            )
            assert matching.status_code == 206
            assert matching.content == data[:10]
    finally:
        node.stop()


def test_writes_are_unsupported(client: httpx.Client, image: Image) -> None:
    writes = [
        ("POST", "/v2/api/app/blobs/uploads/"),
        ("PUT", "/v2/api/app/manifests/v2"),
        ("PATCH", "/v2/api/app/blobs/uploads/abc"),
        ("DELETE", f"/v2/api/app/manifests/{image.digest}"),
        ("DELETE", f"/v2/api/app/blobs/{image.layer_digests[0]}"),
    ]
    for method, path in writes:
        response = client.request(method, path, content=b"x")
        assert response.status_code == 405, (method, path)
        assert response.json()["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/API/app/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/api/../etc/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/api/%2e%2e/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
        ("/v2/api/app/blobs/sha256:../../../etc/passwd", 404, "NOT_FOUND"),
        ("/v2/api/app/blobs/sha256:..%2F..%2Fetc%2Fpasswd", 404, "NOT_FOUND"),
        ("/v2/api/app/blobs/sha256:....", 400, "DIGEST_INVALID"),
        ("/v2/api/app/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/api/app/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/api/app/manifests/-bad-tag", 400, "MANIFEST_INVALID"),
        ("/v2/api/app/manifests/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/api/app/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/api/app/tags/list?n=abc", 400, "PAGINATION_NUMBER_INVALID"),
        # A superscript two is a digit to str.isdigit, not to int.
        ("/v2/api/app/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/api/app/tags/list?n=" + "9" * 4000, 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/api/app/tags/list?n=10001", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/api/app/tags/list?last=" + "a" * 257, 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?n=1.5", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/_catalog?n=%FF", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/api/%FF/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/api/app/manifests/%FF", 400, "MANIFEST_INVALID"),
        ("/v2/api/app/blobs/sha256:%00", 400, "DIGEST_INVALID"),
        ("/v2/api/app/tags/list?ns=nowhere.example", 404, "NAME_UNKNOWN"),
        ("/v2/nowhere.example/api/app/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/api/app/manifests/missing", 404, "MANIFEST_UNKNOWN"),
        ("/v2/api/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/api/app/nothing", 404, "NOT_FOUND"),
        ("/elsewhere", 404, "NOT_FOUND"),
    ],
)
def test_bad_input_gets_an_oci_error(node: NodeProcess, path: str, status: int, code: str) -> None:
    before = node.stored_digests()
    # http.client sends the path as written; httpx would resolve the dots.
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == status
    assert body["errors"][0]["code"] == code
    assert node.stored_digests() == before
    assert not (node.cache_dir.parent / "etc").exists()


def test_a_page_of_none_is_empty(client: httpx.Client, image: Image) -> None:
    client.get("/v2/api/app/manifests/v1")
    for path, field in (("/v2/_catalog", "repositories"), ("/v2/api/app/tags/list", "tags")):
        response = client.get(path, params={"n": "0"})
        assert response.status_code == 200, response.text
        assert response.json()[field] == []
        assert "Link" not in response.headers


def _raw(node: NodeProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as connection:
        connection.sendall(request)
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        return answer.status, dict(answer.getheaders()), answer.read()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, id="header too long"),
        pytest.param(
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n",
            431,
            id="too many headers",
        ),
        pytest.param(b"GET /v2/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="request line too long"),
        pytest.param(b"\x16\x03\x01 garbage\r\n\r\n", 400, id="not HTTP"),
        pytest.param(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400, id="invalid header name"),
        pytest.param(b"GET /v2/api/\xff/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="raw non-ASCII path"),
        pytest.param(b"get /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="lower-case method"),
        pytest.param(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, id="bad length"),
        pytest.param(b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n", 400, id="unknown HTTP version"),
        pytest.param(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417, id="unknown expectation"),
    ],
)
def test_requests_gunicorn_refuses_get_an_oci_error(node: NodeProcess, request_bytes: bytes, status: int) -> None:
    answered, headers, body = _raw(node, request_bytes)
    assert answered == status
    assert headers["Content-Type"] == "application/json"
    errors = json.loads(body)["errors"]
    assert errors[0]["code"] == ("UNSUPPORTED" if status == 417 else "UNKNOWN")
    assert "aaaa" not in errors[0]["message"]


def test_tags_list_and_catalog(client: httpx.Client, upstream_registry: DistributionRegistry) -> None:
    small = build_image([1000], seed="tags")
    for tag in ("a", "b", "c"):
        push(upstream_registry.url, "api/tags", tag, small)
    assert client.get("/v2/api/tags/tags/list").json() == {"name": "api/tags", "tags": ["a", "b", "c"]}
    page = client.get("/v2/api/tags/tags/list", params={"n": 2})
    assert page.json()["tags"] == ["a", "b"]
    assert "last=b" in page.headers["Link"]
    assert client.get("/v2/api/tags/tags/list", params={"n": 2, "last": "b"}).json()["tags"] == ["c"]
    client.get("/v2/api/tags/manifests/a")
    catalog = client.get("/v2/_catalog").json()["repositories"]
    assert "api/tags" in catalog
    assert catalog == sorted(catalog)


def test_skopeo_copy_through_the_node(node: NodeProcess, image: Image, tmp_path: Path) -> None:
    skopeo_copy(f"127.0.0.1:{node.port}/api/app:v1", tmp_path / "copy")
    for digest, data in image.blobs.items():
        copied = tmp_path / "copy" / digest.split(":")[1]
        assert copied.read_bytes() == data
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == image.manifest


def test_concurrent_cold_pulls_fetch_each_blob_once(tmp_path: Path, upstream_registry: DistributionRegistry) -> None:
    built = build_image([1_500_000, 800_000, 200_000, 50_000], seed="burst")
    push(upstream_registry.url, "api/burst", "v1", built)
    node = NodeProcess(tmp_path, upstream_registry.url, {"server": {"workers": 3}})

    def pull(_: int) -> dict[str, str]:
        with node.client() as http:
            manifest = http.get("/v2/api/burst/manifests/v1")
            assert manifest.status_code == 200
            digests = {}
            for digest in built.blobs:
                body = http.get(f"/v2/api/burst/blobs/{digest}").content
                digests[digest] = "sha256:" + hashlib.sha256(body).hexdigest()
            return digests

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(pull, range(16)))
    finally:
        node.stop()
    for result in results:
        assert result == {digest: digest for digest in built.blobs}
    for digest in built.blobs:
        path = f"/v2/api/burst/blobs/{digest}"
        wait_until(lambda path=path: upstream_registry.count("GET", path) >= 1, message=f"no GET of {path}")
        assert upstream_registry.count("GET", path) == 1, path
    assert upstream_registry.count("GET", f"/v2/api/burst/manifests/{built.digest}") == 1
    assert upstream_registry.count("HEAD", "/v2/api/burst/manifests/v1") == 1
