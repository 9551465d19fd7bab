"""Paginated tag lists and catalogs: the Link to the next page points back at the mirror.

The node (its Flask app) runs in front of the fake upstream on a real
socket; the fake paginates tag lists and links to the next page as
distribution 3 does, with a path of its own that a client of the mirror
must never be sent to.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from node.app import create_app
from node.config import config_from_dict
from testbed.fake_upstream import FakeUpstream
from testbed.images import build_image

REGISTRY = "fake.example"
NAME = "team/app"
TAGS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        image = build_image([100], seed="pagination")
        for tag in TAGS:
            fake.add_image(NAME, tag, image)
        for other in ("team/other", "team/third"):
            fake.add_image(other, "v1", image)
        yield fake


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[FlaskClient]:
    cache = tmp_path_factory.mktemp("pagination")
    config = config_from_dict(
        {"upstreams": {REGISTRY: {"url": upstream.url}}, "default_upstream": REGISTRY, "cache": {"dir": str(cache)}}
    )
    app = create_app(config)
    try:
        yield app.test_client()
    finally:
        app.extensions["shoal.node"].close()


def _next(link: str) -> str:
    match = re.fullmatch(r'<([^>]*)>; rel="next"', link)
    assert match is not None, link
    return match[1]


def _walk(client: FlaskClient, url: str, field: str) -> tuple[list[str], list[str]]:
    """Every item of every page from ``url`` on, and the Links that led there."""
    items: list[str] = []
    links: list[str] = []
    for _ in range(10):
        response = client.get(url)
        assert response.status_code == 200, response.data
        items += response.json[field]  # type: ignore[index]
        if "Link" not in response.headers:
            return items, links
        url = _next(response.headers["Link"])
        links.append(url)
    raise AssertionError(f"more pages than items: {links}")


@pytest.mark.parametrize(
    ("first", "path", "query"),
    [
        pytest.param(f"/v2/{REGISTRY}/{NAME}/tags/list?n=2", f"/v2/{REGISTRY}/{NAME}/tags/list", {}, id="path prefix"),
        pytest.param(f"/v2/{NAME}/tags/list?n=2&ns={REGISTRY}", f"/v2/{NAME}/tags/list", {"ns": REGISTRY}, id="ns"),
        pytest.param(f"/v2/{NAME}/tags/list?n=2", f"/v2/{NAME}/tags/list", {}, id="default registry"),
    ],
)
def test_an_upstream_page_links_back_at_the_mirror(
    client: FlaskClient, upstream: FakeUpstream, first: str, path: str, query: dict[str, str]
) -> None:
    tags, links = _walk(client, first, "tags")
    assert tags == TAGS
    assert len(links) == 2
    for link, last in zip(links, ("b", "d"), strict=True):
        link_path, _, link_query = link.partition("?")
        assert link_path == path
        assert dict(pair.split("=") for pair in link_query.split("&")) == {"n": "2", "last": last, **query}
    # The pages came from the upstream, which made the Links the node rewrote.
    assert any("last=b" in asked for _, asked in upstream.requests)


def test_the_cached_catalog_links_back_under_the_prefix(client: FlaskClient) -> None:
    for pulled in (f"{NAME}:a", "team/other:v1", "team/third:v1"):
        name, _, tag = pulled.partition(":")
        assert client.get(f"/v2/{REGISTRY}/{name}/manifests/{tag}").status_code == 200
    repositories, links = _walk(client, f"/v2/{REGISTRY}/_catalog?n=2", "repositories")
    assert repositories == sorted([NAME, "team/other", "team/third"])
    assert [link.partition("?")[0] for link in links] == [f"/v2/{REGISTRY}/_catalog"]
    repositories, links = _walk(client, f"/v2/_catalog?n=1&ns={REGISTRY}", "repositories")
    assert len(repositories) == 3
    assert all(link.startswith("/v2/_catalog?") and f"ns={REGISTRY}" in link for link in links)


def test_n_zero_is_an_empty_page_without_asking_the_upstream(client: FlaskClient, upstream: FakeUpstream) -> None:
    upstream.reset_requests()
    response = client.get(f"/v2/{NAME}/tags/list?n=0")
    assert response.status_code == 200
    assert response.json == {"name": NAME, "tags": []}
    assert "Link" not in response.headers
    assert upstream.requests == []
    catalog = client.get("/v2/_catalog?n=0")
    assert catalog.status_code == 200
    assert catalog.json == {"repositories": []}
