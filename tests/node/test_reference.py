import pytest

from node.errors import DigestInvalid, NameInvalid, TagInvalid
from node.reference import digest_of, normalize_name, parse_digest, parse_name, parse_tag

GOOD_HEX = "a" * 64


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "a/b/c", "my-app", "my__app", "a.b_c-d/e", "x" * 255])
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "Alpine", "../etc", "a/../b", "a//b", "/a", "a/", "-a", "a-", "a..b", "a___b", ".", "..", "a b", "x" * 256],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_name(name)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A" * 128, "3.19"])
def test_valid_tags(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".hidden", "-x", "a/b", "A" * 129, "a:b", ".."])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalid):
        parse_tag(tag)


def test_valid_digests() -> None:
    assert str(parse_digest(f"sha256:{GOOD_HEX}")) == f"sha256:{GOOD_HEX}"
    assert parse_digest("sha512:" + "b" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "md5:" + "a" * 32,
        "sha256",
        "sha256:",
        "sha256:../../etc/passwd",
        ":" + GOOD_HEX,
        "sha256:" + GOOD_HEX + "/x",
    ],
)
def test_invalid_digests(digest: str) -> None:
    with pytest.raises(DigestInvalid):
        parse_digest(digest)


def test_digest_of_matches_sha256() -> None:
    assert str(digest_of(b"")) == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_docker_hub_names_are_normalised_only_for_docker_hub() -> None:
    assert normalize_name("alpine", docker_hub=True) == "library/alpine"
    assert normalize_name("team/app", docker_hub=True) == "team/app"
    assert normalize_name("alpine", docker_hub=False) == "alpine"
