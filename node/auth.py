"""Who may pull what: client authentication in front of the registry API.

Configured like distribution's ``auth:`` section, so an existing
configuration carries over (docs/configuration.md#access-control):

- ``auth.htpasswd`` (``realm``, ``path``): users and bcrypt hashes, as
  ``htpasswd -B`` writes them; any user in the file may pull everything.
  The file is read again when it changes.
- ``auth.token`` (``realm``, ``service``, ``issuer``, ``rootcertbundle``):
  bearer JWTs from a token server (the Docker token protocol). A token
  counts when its signature verifies with a key of the bundle's
  certificates, it is within ``nbf``/``exp``, ``iss`` is the issuer, ``aud``
  names the service, and its ``access`` claim grants the scope asked for.

Without either, every request is admitted, as before. With one, an upstream
may still admit anonymous pulls (``anonymous: true``), optionally only from
``anonymous_networks``. A refusal is a 401 ``UNAUTHORIZED`` with the
challenge a client needs: ``Basic realm=...``, or ``Bearer
realm=...,service=...,scope=...`` naming the scope to ask the token server
for. Credentials never reach a log or an error.

A scope names a repository as the client addressed it: ``team/app`` through
the default registry, ``ghcr.io/team/app`` when containerd's ``ns`` or a
path prefix named the registry. The catalog is ``registry:catalog:*``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import bcrypt
import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from node.config import NodeConfig, TokenConfig, UpstreamConfig
from node.errors import ShoalError
from node.offload import run_blocking

log = logging.getLogger(__name__)

# How often the htpasswd file is looked at for a change (seconds).
RELOAD_INTERVAL = 1.0
# Verified (user, password) pairs kept per worker, so that bcrypt (tens of
# milliseconds by design) runs once per client, not once per request.
VERIFIED_MAX = 1024
# Signature algorithms a token may use: asymmetric only, so that a token
# cannot be signed with a certificate's public key as an HMAC secret.
TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
# Clock skew allowed between the token server and the node (seconds).
TOKEN_LEEWAY = 60
# Longest Authorization header looked at; beyond it the request is refused.
HEADER_MAX = 16 * 1024


class Unauthorized(ShoalError):
    code, status = "UNAUTHORIZED", 401

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge


@dataclass(frozen=True)
class Scope:
    """What a request asks for: ``repository:<name>:pull`` or ``registry:catalog:*``."""

    type: str
    name: str
    action: str

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{self.action}"


CATALOG = Scope("registry", "catalog", "*")


def pull(name: str) -> Scope:
    return Scope("repository", name, "pull")


class Htpasswd:
    """The users of an htpasswd file, read again when the file changes."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._identity: tuple[int, int, int] | None = None
        self._hashes: dict[str, bytes] = {}
        self._verified: OrderedDict[tuple[str, bytes, bytes], None] = OrderedDict()
        self._load()

    def verify(self, user: str, password: str) -> bool:
        self._reload_if_changed()
        hashed = self._hashes.get(user)
        if hashed is None:
            return False
        # The password itself is not kept, only a hash of it with the entry.
        key = (user, hashlib.sha256(password.encode("utf-8", "surrogateescape")).digest(), hashed)
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
        # bcrypt releases the GIL: checked in the thread pool, the worker's
        # other clients are served meanwhile.
        if not run_blocking(_bcrypt_matches, password, hashed):
            return False
        with self._lock:
            self._verified[key] = None
            while len(self._verified) > VERIFIED_MAX:
                self._verified.popitem(last=False)
        return True

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if now - self._checked_at < RELOAD_INTERVAL:
            return
        self._checked_at = now
        try:
            info = os.stat(self.path)
        except OSError as exc:
            log.warning("cannot read the htpasswd file %s (%s): keeping the users read before", self.path, exc)
            return
        if (info.st_ino, info.st_mtime_ns, info.st_size) != self._identity:
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                info = os.fstat(handle.fileno())
                text = handle.read()
        except OSError as exc:
            if self._identity is None:
                raise ValueError(f"cannot read the htpasswd file {self.path}: {exc.strerror}") from None
            log.warning("cannot read the htpasswd file %s (%s): keeping the users read before", self.path, exc)
            return
        hashes, skipped = parse_htpasswd(text)
        if skipped:
            log.warning("htpasswd file %s: ignored %d lines that are not user:bcrypt-hash", self.path, skipped)
        with self._lock:
            self._hashes = hashes
            self._verified.clear()
            self._identity = (info.st_ino, info.st_mtime_ns, info.st_size)
        log.info("read %d users from %s", len(hashes), self.path)


def parse_htpasswd(text: bytes) -> tuple[dict[str, bytes], int]:
    """Users and their bcrypt hashes; and how many non-empty lines were not such an entry.

    Only bcrypt is accepted, as by distribution: MD5, SHA1 and crypt entries
    are skipped.
    """
    hashes: dict[str, bytes] = {}
    skipped = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user or not hashed.startswith((b"$2a$", b"$2b$", b"$2y$")):
            skipped += 1
            continue
        hashes[user.decode("utf-8", "surrogateescape")] = hashed
    return hashes, skipped


def _bcrypt_matches(password: str, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password.encode("utf-8", "surrogateescape"), hashed))
    except ValueError:
        # A malformed hash in the file, or a password bcrypt refuses.
        return False


class TokenVerifier:
    """Checks bearer tokens from the token server named by ``auth.token``."""

    def __init__(self, config: TokenConfig) -> None:
        assert config.rootcertbundle and config.issuer and config.service
        self.config = config
        self._issuer, self._service = config.issuer, config.service
        try:
            with open(config.rootcertbundle, "rb") as handle:
                self._roots = x509.load_pem_x509_certificates(handle.read())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the certificates of auth.token.rootcertbundle: {exc}") from None

    def claims(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is valid for this node; None otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        for key in self._keys(header):
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=TOKEN_ALGORITHMS,
                    audience=self._service,
                    issuer=self._issuer,
                    leeway=TOKEN_LEEWAY,
                    options={"require": ["exp", "iss", "aud"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                return None
            return claims
        return None

    def _keys(self, header: dict[str, Any]) -> Iterable[Any]:
        """The keys that may have signed a token with this header.

        A token may carry its signing certificate (``x5c``); it counts only
        when it is one of the bundle's or was issued by one of them.
        """
        chain = header.get("x5c")
        if not chain:
            return [root.public_key() for root in self._roots]
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        except (TypeError, ValueError, IndexError, binascii.Error):
            return []
        for root in self._roots:
            if leaf == root:
                return [leaf.public_key()]
            try:
                leaf.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return [leaf.public_key()]
        return []


def grants(claims: dict[str, Any], scope: Scope) -> bool:
    """Whether the token's ``access`` claim grants ``scope``."""
    access = claims.get("access")
    if not isinstance(access, list):
        return False
    for entry in access:
        if not isinstance(entry, dict):
            continue
        actions = entry.get("actions")
        if entry.get("type") != scope.type or entry.get("name") != scope.name or not isinstance(actions, list):
            continue
        if scope.action in actions or "*" in actions:
            return True
    return False


@dataclass(frozen=True)
class Client:
    """What a request says about who sends it."""

    address: str | None
    authorization: str | None


class Gate:
    """The node's access policy: ``admit`` raises ``Unauthorized`` unless the client may have ``scope``."""

    def __init__(self, config: NodeConfig) -> None:
        auth = config.auth
        self.htpasswd = Htpasswd(auth.htpasswd.path) if auth.htpasswd.path else None
        self.token = TokenVerifier(auth.token) if auth.token.realm else None
        self._realm = auth.htpasswd.realm if self.htpasswd is not None else (auth.token.realm or "")
        self._service = auth.token.service or ""
        self._anonymous = {upstream.name: _anonymous_networks(upstream) for upstream in config.upstreams}

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or self.token is not None

    def admit(self, client: Client, scope: Scope | None, registry: str | None, *, anonymous: bool = True) -> None:
        """Admit a request for ``scope`` (None: the base endpoint) on ``registry`` (None: any).

        ``anonymous=False`` asks for credentials even where an upstream
        admits anonymous pulls (the operator's endpoints).
        """
        if not self.enabled or (anonymous and self._anonymous_ok(client, registry)):
            return
        authorization = client.authorization or ""
        if len(authorization) > HEADER_MAX:
            raise Unauthorized("the Authorization header is too long", self._challenge(scope))
        kind, _, credentials = authorization.strip().partition(" ")
        kind, credentials = kind.lower(), credentials.strip()
        if self.htpasswd is not None:
            if kind == "basic" and self._basic_ok(credentials):
                return
            raise Unauthorized("authentication required", self._challenge(scope))
        assert self.token is not None
        claims = self.token.claims(credentials) if kind == "bearer" and credentials else None
        if claims is None:
            raise Unauthorized("authentication required", self._challenge(scope))
        if scope is not None and not grants(claims, scope):
            raise Unauthorized("the token does not grant access to this", self._challenge(scope, "insufficient_scope"))

    def _anonymous_ok(self, client: Client, registry: str | None) -> bool:
        candidates = self._anonymous.values() if registry is None else [self._anonymous.get(registry)]
        return any(networks is not None and _within(client.address, networks) for networks in candidates)

    def _basic_ok(self, credentials: str) -> bool:
        assert self.htpasswd is not None
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        return bool(sep) and self.htpasswd.verify(user, password)

    def _challenge(self, scope: Scope | None, error: str | None = None) -> str:
        if self.htpasswd is not None:
            return f'Basic realm="{_quoted(self._realm)}"'
        parts = [f'realm="{_quoted(self._realm)}"', f'service="{_quoted(self._service)}"']
        if scope is not None:
            parts.append(f'scope="{_quoted(str(scope))}"')
        if error is not None:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _anonymous_networks(upstream: UpstreamConfig) -> Networks | None:
    """The networks an upstream admits anonymous pulls from; None: none at all, empty: any."""
    if not upstream.anonymous:
        return None
    return tuple(ipaddress.ip_network(network, strict=False) for network in upstream.anonymous_networks)


def _within(address: str | None, networks: Networks) -> bool:
    if not networks:
        return True
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
