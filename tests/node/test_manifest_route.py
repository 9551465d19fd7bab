"""Manifest requests answered in front of Flask get Flask's answer, byte for byte.

``node/manifest_route.py`` answers ``GET`` and ``HEAD`` of manifests before
Flask sees them. Each request here goes to the app as gunicorn calls it
(through that layer) and to the Flask app behind it; the status, the
headers and the body must be the same. The requests are drawn as the fuzz
test draws them (``test_fuzz_api``'s strategies and upstream): good and bad
names, references, registries, ``ns`` values, ``If-None-Match`` and
``Authorization`` headers, open and with htpasswd users.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import pytest
from flask import Flask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client

from node.manifest_route import ManifestRoute
from tests.node.test_fuzz_api import (
    _HEADERS,
    _NAMES,
    _QUERIES,
    _REFERENCES,
    BASIC,
    EXAMPLES,
    MANIFEST,
    MANIFEST_DIGEST,
    REGISTRY,
    fuzz_app,
)

_PATHS = st.one_of(
    st.builds(lambda name, reference: f"/v2/{name}/manifests/{reference}", _NAMES, _REFERENCES),
    st.sampled_from([f"/v2/{REGISTRY}/manifests/v1", "/v2//app/manifests/v1", "/v2/app/manifests/v1/"]),
)


class Counting:
    """The Flask app behind the layer, counting the requests that reach it."""

    def __init__(self, app: Flask) -> None:
        self.route: ManifestRoute = app.wsgi_app  # type: ignore[assignment]
        self.inner = self.route._app
        self.reached = 0
        self.route._app = self._counted

    def _counted(self, environ, start_response):  # type: ignore[no-untyped-def]
        self.reached += 1
        return self.inner(environ, start_response)


@pytest.fixture(scope="module", params=["open", "htpasswd"])
def apps(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Client, Client, Counting]]:
    app = fuzz_app(tmp_path_factory.mktemp("route"), users=request.param == "htpasswd")
    counting = Counting(app)
    try:
        yield Client(counting.route), Client(counting.inner), counting
    finally:
        app.extensions["shoal.node"].close()


def _answer(client: Client, method: str, path: str, query: dict[str, str], headers: dict[str, str]):  # type: ignore[no-untyped-def]
    response = client.open(path, method=method, query_string=urllib.parse.urlencode(query), headers=headers)
    return response.status_code, sorted(response.headers.items()), response.get_data()


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD"]), path=_PATHS, query=_QUERIES, headers=_HEADERS)
@example("GET", "/v2/app/manifests/v1", {}, {"Authorization": BASIC})
@example("GET", f"/v2/app/manifests/{MANIFEST_DIGEST}", {}, {"Authorization": BASIC, "If-None-Match": "*"})
@example("HEAD", f"/v2/{REGISTRY}/app/manifests/v1", {}, {"Authorization": BASIC})
@example("GET", "/v2/app/manifests/v1", {"ns": "other.test"}, {})
def test_the_layer_answers_as_flask_does(
    apps: tuple[Client, Client, Counting], method: str, path: str, query: dict[str, str], headers: dict[str, str]
) -> None:
    front, flask_only, _ = apps
    sent = urllib.parse.quote(path, safe="/%:@!$&'()*+,;=")
    assert _answer(front, method, sent, query, headers) == _answer(flask_only, method, sent, query, headers)


def test_a_warm_manifest_never_reaches_flask(apps: tuple[Client, Client, Counting]) -> None:
    front, _, counting = apps
    auth = {"Authorization": BASIC}
    assert front.get("/v2/team/app/manifests/v1", headers=auth).get_data() == MANIFEST
    before = counting.reached
    for reference in ("v1", MANIFEST_DIGEST):
        response = front.get(f"/v2/team/app/manifests/{reference}", headers=auth)
        assert response.status_code == 200 and response.get_data() == MANIFEST
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert front.head(f"/v2/team/app/manifests/{reference}", headers=auth).get_data() == b""
    assert front.get("/v2/team/app/manifests/-bad", headers=auth).status_code == 400
    assert counting.reached == before
    # What is not a manifest request goes on to Flask.
    assert front.get("/v2/", headers=auth).status_code == 200
    assert front.open("/v2/team/app/manifests/v1", method="DELETE", headers=auth).status_code == 405
    assert counting.reached == before + 2
