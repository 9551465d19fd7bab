"""Client authentication: htpasswd users, token server tokens, anonymous upstreams (node/auth.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from node import auth
from node.auth import CATALOG, Client, Gate, Htpasswd, TokenVerifier, Unauthorized, grants, parse_htpasswd, pull
from node.config import ConfigError, config_from_dict
from testbed.clock import FakeClock
from testbed.token_server import ISSUER, SERVICE, SigningKey


def htpasswd_file(path: Path, user: str, password: str, *, create: bool = True) -> Path:
    """An entry written by Debian's ``htpasswd -B`` (apache2-utils), as an operator makes one."""
    binary = shutil.which("htpasswd")
    if binary is None:
        raise RuntimeError("htpasswd not found on PATH; install the Debian package 'apache2-utils'")
    flags = "-cbB" if create else "-bB"
    subprocess.run([binary, flags, str(path), user, password], check=True, capture_output=True)
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _gate(raw: dict[str, Any]) -> Gate:
    return Gate(config_from_dict(raw))


# htpasswd.


def test_htpasswd_accepts_bcrypt_entries_only(tmp_path: Path) -> None:
    path = htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    text = path.read_bytes() + b"bob:$apr1$abcdefgh$0123456789abcdefghijkl\n# a comment\n\ncarol:plain\n"
    hashes, skipped = parse_htpasswd(text)
    assert list(hashes) == ["alice"]
    assert skipped == 2


def test_htpasswd_verifies_and_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    clock = FakeClock()
    path = htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    users = Htpasswd(str(path), clock=clock)
    assert users.verify("alice", "s3cret")
    assert not users.verify("alice", "wrong")
    assert not users.verify("bob", "s3cret")

    htpasswd_file(path, "bob", "hunter2", create=False)
    htpasswd_file(path, "alice", "changed", create=False)
    # Looked at again only after the reload interval.
    assert users.verify("alice", "s3cret")
    clock.advance(auth.RELOAD_INTERVAL)
    assert users.verify("bob", "hunter2")
    assert users.verify("alice", "changed")
    # The earlier verification of the old password does not outlive the change.
    assert not users.verify("alice", "s3cret")


def test_htpasswd_keeps_its_users_while_the_file_is_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    path = htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    users = Htpasswd(str(path), clock=clock)
    path.unlink()
    clock.advance(auth.RELOAD_INTERVAL)
    assert users.verify("alice", "s3cret")


def test_htpasswd_that_cannot_be_read_at_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the htpasswd file"):
        Htpasswd(str(tmp_path / "missing"))


def test_a_verified_password_is_not_checked_with_bcrypt_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = Htpasswd(str(htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")))
    checks: list[str] = []
    real = auth._bcrypt_matches

    def counted(password: str, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(auth, "_bcrypt_matches", counted)
    for _ in range(5):
        assert users.verify("alice", "s3cret")
        assert not users.verify("alice", "nope")
    assert checks.count("s3cret") == 1
    # A wrong password is never remembered: each attempt costs a check.
    assert checks.count("nope") == 5


def test_gate_with_htpasswd_challenges_with_basic(tmp_path: Path) -> None:
    path = htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    gate = _gate({"auth": {"htpasswd": {"realm": "Shoal mirror", "path": str(path)}}})
    gate.admit(Client("10.1.2.3", basic("alice", "s3cret")), pull("team/app"), "docker.io")
    for authorization in (None, basic("alice", "wrong"), "Basic !!!", "Bearer abc", basic("alice", "") + "x" * 20000):
        with pytest.raises(Unauthorized) as refused:
            gate.admit(Client("10.1.2.3", authorization), pull("team/app"), "docker.io")
        assert refused.value.challenge == 'Basic realm="Shoal mirror"'
        assert refused.value.status == 401
        assert refused.value.code == "UNAUTHORIZED"
        assert "s3cret" not in refused.value.message


# Tokens.


@pytest.fixture
def signer() -> SigningKey:
    return SigningKey()


@pytest.fixture
def token_gate(tmp_path: Path, signer: SigningKey) -> Gate:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(signer.certificate_pem())
    return _gate(
        {
            "auth": {
                "token": {
                    "realm": "https://auth.example/token",
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(bundle),
                }
            }
        }
    )


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 1,
        "iat": now,
        "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}],
    }
    claims.update(overrides)
    return claims


def _bearer(token: str) -> Client:
    return Client("10.1.2.3", f"Bearer {token}")


def test_a_token_granting_pull_on_the_repository_is_admitted(token_gate: Gate, signer: SigningKey) -> None:
    token_gate.admit(_bearer(signer.sign(_claims())), pull("team/app"), "docker.io")
    # The base endpoint needs a valid token, whatever it grants.
    token_gate.admit(_bearer(signer.sign(_claims(access=[]))), None, None)


def test_a_token_for_another_repository_gets_the_scope_to_ask_for(token_gate: Gate, signer: SigningKey) -> None:
    with pytest.raises(Unauthorized) as refused:
        token_gate.admit(_bearer(signer.sign(_claims())), pull("team/other"), "docker.io")
    assert refused.value.challenge == (
        'Bearer realm="https://auth.example/token",service="shoal-test",'
        'scope="repository:team/other:pull",error="insufficient_scope"'
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": int(time.time()) - 3600},
        {"nbf": int(time.time()) + 3600},
        {"iss": "someone-else"},
        {"aud": "another-service"},
        {"access": [{"type": "repository", "name": "team/app", "actions": ["push"]}]},
        {"access": "team/app"},
    ],
    ids=["expired", "not-yet-valid", "wrong-issuer", "wrong-audience", "push-only", "malformed-access"],
)
def test_tokens_that_do_not_count_are_refused(token_gate: Gate, signer: SigningKey, overrides: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized):
        token_gate.admit(_bearer(signer.sign(_claims(**overrides))), pull("team/app"), "docker.io")


def test_a_token_signed_by_another_key_is_refused(token_gate: Gate) -> None:
    with pytest.raises(Unauthorized) as refused:
        token_gate.admit(_bearer(SigningKey().sign(_claims())), pull("team/app"), "docker.io")
    assert refused.value.challenge == (
        'Bearer realm="https://auth.example/token",service="shoal-test",scope="repository:team/app:pull"'
    )


def test_a_token_with_its_own_certificate_counts_only_if_the_bundle_issued_it(
    token_gate: Gate, signer: SigningKey
) -> None:
    other = SigningKey()
    der = base64.b64encode(other.certificate.public_bytes(serialization.Encoding.DER)).decode()
    with pytest.raises(Unauthorized):
        token_gate.admit(_bearer(other.sign(_claims(), {"x5c": [der]})), pull("team/app"), "docker.io")
    own = base64.b64encode(signer.certificate.public_bytes(serialization.Encoding.DER)).decode()
    token_gate.admit(_bearer(signer.sign(_claims(), {"x5c": [own]})), pull("team/app"), "docker.io")


def test_unsigned_and_symmetric_tokens_are_refused(token_gate: Gate, signer: SigningKey) -> None:
    unsigned = _jws({"alg": "none", "typ": "JWT"}, _claims(), b"")
    # The classic confusion: the public certificate used as an HMAC secret.
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = f"{_b64(header)}.{_b64(_claims())}".encode()
    mac = hmac.new(signer.certificate_pem(), signing_input, hashlib.sha256).digest()
    symmetric = _jws(header, _claims(), mac)
    for token in (unsigned, symmetric, "not-a-jwt", "a.b.c", ""):
        with pytest.raises(Unauthorized):
            token_gate.admit(_bearer(token), pull("team/app"), "docker.io")


def _b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _jws(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    return f"{_b64(header)}.{_b64(claims)}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def test_grants_reads_the_access_claim() -> None:
    claims = {
        "access": [
            {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
            {"type": "registry", "name": "catalog", "actions": ["*"]},
            "junk",
        ]
    }
    assert grants(claims, pull("team/app"))
    assert grants(claims, CATALOG)
    assert not grants(claims, pull("team/app2"))
    assert not grants({"access": [{"type": "repository", "name": "team/app"}]}, pull("team/app"))


def test_token_verifier_needs_a_readable_bundle(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "auth": {
                "token": {
                    "realm": "https://auth.example/token",
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(tmp_path / "missing.pem"),
                }
            }
        }
    )
    with pytest.raises(ValueError, match="rootcertbundle"):
        TokenVerifier(config.auth.token)


# Anonymous upstreams.


def test_an_anonymous_upstream_beside_a_private_one(tmp_path: Path) -> None:
    path = htpasswd_file(tmp_path / "htpasswd", "alice", "s3cret")
    gate = _gate(
        {
            "auth": {"htpasswd": {"path": str(path)}},
            "upstreams": {
                "docker.io": {"url": "https://registry-1.docker.io", "anonymous": True},
                "private.example": {"url": "https://private.example"},
                "lab.example": {"url": "https://lab.example", "anonymous": True, "anonymous_networks": ["10.0.0.0/8"]},
            },
            "default_upstream": "docker.io",
        }
    )
    nobody = Client("192.0.2.7", None)
    gate.admit(nobody, pull("library/alpine"), "docker.io")
    with pytest.raises(Unauthorized):
        gate.admit(nobody, pull("private.example/team/app"), "private.example")
    gate.admit(Client("192.0.2.7", basic("alice", "s3cret")), pull("private.example/team/app"), "private.example")
    # Networks: the peer's address, IPv4-mapped IPv6 included.
    gate.admit(Client("10.9.8.7", None), pull("lab.example/x"), "lab.example")
    gate.admit(Client("::ffff:10.9.8.7", None), pull("lab.example/x"), "lab.example")
    for address in ("192.0.2.7", None, "not-an-address"):
        with pytest.raises(Unauthorized):
            gate.admit(Client(address, None), pull("lab.example/x"), "lab.example")
    # The base endpoint answers a client that may pull anonymously from somewhere.
    gate.admit(nobody, None, None)
    # The operator's endpoints never admit anonymous clients.
    with pytest.raises(Unauthorized):
        gate.admit(nobody, CATALOG, None, anonymous=False)


def test_without_auth_everything_is_admitted() -> None:
    gate = _gate({})
    assert not gate.enabled
    gate.admit(Client(None, None), pull("team/app"), "docker.io")
    gate.admit(Client(None, "Basic garbage"), CATALOG, None, anonymous=False)


# Configuration.


def test_auth_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^auth: give either htpasswd or token, not both$"):
        config_from_dict({"auth": {"htpasswd": {"path": "/x"}, "token": {"realm": "https://a/token"}}})
    with pytest.raises(ConfigError, match=r"^auth\.token\.service: required with auth\.token\.realm$"):
        config_from_dict({"auth": {"token": {"realm": "https://a/token"}}})
    with pytest.raises(ConfigError, match=r"^auth\.token\.realm: required"):
        config_from_dict({"auth": {"token": {"service": "s"}}})
    with pytest.raises(ConfigError, match=r"^upstream\.anonymous_networks: 'nowhere' is not a network"):
        config_from_dict({"upstream": {"anonymous_networks": ["nowhere"]}})
    with pytest.raises(ConfigError, match=r"^auth\.htpasswd\.colour: unknown key"):
        config_from_dict({"auth": {"htpasswd": {"colour": "blue"}}})
    with pytest.raises(ConfigError, match=r"^server\.metrics_bind: must be another port than server\.bind$"):
        config_from_dict({"server": {"bind": "0.0.0.0:5000", "metrics_bind": "127.0.0.1:5000"}})


def test_auth_is_set_from_the_environment() -> None:
    config = config_from_dict(
        {}, {"SHOAL_AUTH__HTPASSWD__PATH": "/etc/shoal/htpasswd", "SHOAL_AUTH__HTPASSWD__REALM": "mirror"}
    )
    assert config.auth.htpasswd.path == "/etc/shoal/htpasswd"
    assert config.auth.htpasswd.realm == "mirror"
    assert config.auth.enabled
