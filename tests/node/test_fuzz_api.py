"""Generated requests against the node's Flask app: never a 5xx, every error an OCI error body.

hypothesis draws paths (well-formed registry paths with odd parts, and
arbitrary text), query parameters, headers and methods. The upstream is an
``httpx.MockTransport`` that holds one repository's worth of content under
any name, so that requests get past validation into the stores: tags,
manifests, blob fills and hits, ranges, pages. The app runs open, and with
htpasswd users, whose credentials are among the Authorization headers drawn.

The suite runs ``EXAMPLES`` examples (a few seconds); a longer run:
``SHOAL_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/node/test_fuzz_api.py``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node.app import create_app
from node.config import config_from_dict
from node.reference import digest_of
from node.upstream import Upstream

EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "150"))

REGISTRY = "registry.test"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
BLOB = bytes(range(256)) * 8
BLOB_DIGEST = str(digest_of(BLOB))
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": BLOB_DIGEST, "size": len(BLOB)},
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = str(digest_of(MANIFEST))
TAGS = ["a", "b", "latest", "v1"]
USER, PASSWORD = "fuzz", "fuzz-password"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

_CONTENT = re.compile(r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")


def _upstream(request: httpx.Request) -> httpx.Response:
    """Every repository holds the manifest (as tag v1 and by digest), its blob and four tags."""
    path = request.url.path
    if path == "/v2/":
        return httpx.Response(200, json={})
    if path.endswith("/tags/list"):
        n = request.url.params.get("n")
        last = request.url.params.get("last", "")
        tags = [tag for tag in TAGS if tag > last]
        headers = {}
        if n is not None and n.isdecimal() and len(tags) > int(n) > 0:
            tags = tags[: int(n)]
            headers["Link"] = f'<{path}?last={tags[-1]}&n={n}>; rel="next"'
        return httpx.Response(200, json={"name": path[4:-10], "tags": tags}, headers=headers)
    content = _CONTENT.fullmatch(path)
    if content is not None:
        reference = content["reference"]
        if content["kind"] == "manifests" and reference in ("v1", MANIFEST_DIGEST):
            headers = {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": MANIFEST_DIGEST}
            return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else MANIFEST)
        if content["kind"] == "blobs" and reference in (BLOB_DIGEST, MANIFEST_DIGEST):
            data = BLOB if reference == BLOB_DIGEST else MANIFEST
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
            return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
    return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN", "message": "unknown"}]})


def fuzz_app(folder: Path, *, users: bool) -> Flask:
    """The node's app over ``_upstream``: open, or with ``USER`` as its one htpasswd user (``BASIC``)."""
    settings: dict[str, object] = {"upstream": {"url": f"https://{REGISTRY}"}, "cache": {"dir": str(folder / "cache")}}
    if users:
        entries = folder / "htpasswd"
        entries.write_bytes(b"%s:%s\n" % (USER.encode(), bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4))))
        settings["auth"] = {"htpasswd": {"realm": "fuzz", "path": str(entries)}}
    config = config_from_dict(settings)
    return create_app(config, upstream=Upstream(config.upstream, transport=httpx.MockTransport(_upstream)))


@pytest.fixture(scope="module", params=["open", "htpasswd"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    """The app as anyone may pull from it, and with htpasswd users (``USER``, who pulls with ``BASIC``)."""
    app = fuzz_app(tmp_path_factory.mktemp("fuzz"), users=request.param == "htpasswd")
    try:
        yield app.test_client()
    finally:
        app.extensions["shoal.node"].close()


# Header values a client can send: no CR or LF, which no HTTP server passes on.
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
_DIGITS = st.from_regex(r"[0-9]{0,25}", fullmatch=True)
_RANGE_SPEC = st.one_of(
    st.tuples(_DIGITS, st.sampled_from(["-", "", "--", " - "]), _DIGITS).map("".join),
    _HEADER_TEXT,
)
_RANGE = st.one_of(
    st.lists(_RANGE_SPEC, max_size=4).map(lambda specs: "bytes=" + ",".join(specs)),
    st.sampled_from(["bytes=", "bytes=0-", "bytes=-1", "items=0-1", "bytes=" + "9" * 5000]),
    _HEADER_TEXT,
)
_NAMES = st.one_of(
    st.sampled_from(["app", "library/app", "team/app", f"{REGISTRY}/app", "other.test/app", "localhost/app"]),
    st.sampled_from(["APP", "a//b", "..", "a/../b", "%2e%2e", "a" * 300, ""]),
    st.text(max_size=20),
)
_REFERENCES = st.one_of(
    st.sampled_from(["v1", "latest", MANIFEST_DIGEST, BLOB_DIGEST, "sha256:" + "0" * 64]),
    st.sampled_from(["sha256:xyz", "md5:" + "a" * 32, "sha512:" + "a" * 128, "-bad", "a" * 200, ":", "sha256:"]),
    st.text(max_size=20),
)
_KINDS = st.sampled_from(["manifests", "blobs", "tags/list", "_catalog", "blobs/uploads", "referrers", "nothing"])
_PATHS = st.one_of(
    st.builds(lambda name, kind, reference: f"/v2/{name}/{kind}/{reference}", _NAMES, _KINDS, _REFERENCES),
    st.builds(lambda name: f"/v2/{name}/tags/list", _NAMES),
    st.sampled_from(["/v2/", "/v2/_catalog", f"/v2/{REGISTRY}/_catalog", "/v2", "/", "/internal/v1/content/x"]),
    st.text(max_size=40).map(lambda text: "/" + text),
)
_QUERY_VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", "10000", "10001", "-1", "\u00b2", "1.5", " 1", REGISTRY, "other.test"]),
    _DIGITS,
    st.text(max_size=20),
)
_QUERIES = st.dictionaries(st.sampled_from(["n", "last", "ns", "digest", "x"]), _QUERY_VALUES, max_size=4)
_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Range": _RANGE,
        "If-Range": st.one_of(st.just(f'"{BLOB_DIGEST}"'), _HEADER_TEXT),
        "If-None-Match": st.one_of(st.just(f'"{MANIFEST_DIGEST}"'), st.just("*"), _HEADER_TEXT),
        "Accept": st.one_of(st.just(MANIFEST_TYPE), _HEADER_TEXT),
        "Authorization": st.one_of(
            st.just(BASIC), st.just(BASIC), st.just("Basic !!!"), st.just("Bearer x.y.z"), _HEADER_TEXT
        ),
    },
)
_METHODS = st.sampled_from(["GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(method=_METHODS, path=_PATHS, query=_QUERIES, headers=_HEADERS)
# The requests of issue 15's table, which answered 500, are always among them.
@example("GET", "/v2/_catalog", {"n": "0"}, {})
@example("GET", "/v2/_catalog", {"n": "\u00b2"}, {})
@example("GET", "/v2/team/app/tags/list", {"n": "0"}, {})
@example("GET", "/v2/team/app/tags/list", {"n": "\u00b2"}, {})
@example("GET", f"/v2/app/blobs/{BLOB_DIGEST}", {}, {"Range": "bytes=" + "1" * 5000})
@example("GET", f"/v2/app/blobs/{BLOB_DIGEST}", {}, {"Range": "bytes=" + "1" * 5000 + "-"})
def test_no_request_gets_a_5xx(
    client: FlaskClient, method: str, path: str, query: dict[str, str], headers: dict[str, str]
) -> None:
    # As a client sends it: percent escapes for what may not stand in a path, those it wrote kept.
    sent = urllib.parse.quote(path, safe="/%:@!$&'()*+,;=")
    response = client.open(sent, method=method, query_string=urllib.parse.urlencode(query), headers=headers)
    assert response.status_code < 500, (response.status_code, response.get_data()[:300])
    if response.status_code >= 400 and method != "HEAD":
        body = response.get_json(silent=True)
        assert isinstance(body, dict), response.get_data()[:300]
        assert isinstance(body["errors"][0]["code"], str)
