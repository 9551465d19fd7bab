"""A small token server for the Docker token protocol, signing with a key of its own.

It speaks what docker_auth, Harbor and GitLab speak: ``GET /token?service=
&scope=...`` with Basic credentials answers ``{"token", "access_token",
"expires_in", "issued_at"}``, a JWT signed with RS256 whose ``access`` claim
grants the asked scopes the user is allowed (``grants``: user -> repository
names; ``*`` for every repository), and whose ``iss``/``aud`` are the
configured issuer and service. Its certificate is written to
``certificate_path`` for the node's ``auth.token.rootcertbundle``.

``sign`` makes a token directly, for the cases a real token server never
issues (expired, another issuer, another key).
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ISSUER = "shoal-test-token-server"
SERVICE = "shoal-test"


class SigningKey:
    """An RSA key and a self-signed certificate for it."""

    def __init__(self, name: str = "token signer") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
        return jwt.encode(dict(claims), self.key, algorithm="RS256", headers=dict(headers or {}))


class TokenServer:
    """Serves tokens on 127.0.0.1 until ``close``; ``requests`` counts the token requests it answered."""

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str],
        grants: Mapping[str, list[str]],
        *,
        issuer: str = ISSUER,
        service: str = SERVICE,
        lifetime: int = 300,
    ) -> None:
        self.users, self.grants = dict(users), dict(grants)
        self.issuer, self.service, self.lifetime = issuer, service, lifetime
        self.signer = SigningKey()
        workdir.mkdir(parents=True, exist_ok=True)
        self.certificate_path = workdir / "token-signer.pem"
        self.certificate_path.write_bytes(self.signer.certificate_pem())
        self.requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def node_settings(self) -> dict[str, Any]:
        """The ``auth:`` section of a node that trusts this server."""
        return {
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.certificate_path),
                }
            }
        }

    def claims(self, subject: str, access: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        claims.update(overrides)
        return claims

    def sign(self, claims: Mapping[str, Any]) -> str:
        return self.signer.sign(claims)

    def _issue(self, user: str, scopes: list[str]) -> str:
        allowed = self.grants.get(user, [])
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and ("*" in allowed or name in allowed):
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a == "pull"]})
            elif kind == "registry" and name == "catalog" and "*" in allowed:
                access.append({"type": kind, "name": name, "actions": ["*"]})
        return self.sign(self.claims(user, access))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                user = self._user()
                if parts.path != "/token" or user is None:
                    self._answer(401, {"details": "bad credentials"})
                    return
                if query.get("service", [""])[0] != server.service:
                    self._answer(400, {"details": "unknown service"})
                    return
                scopes = [scope for value in query.get("scope", []) for scope in value.split(" ") if scope]
                token = server._issue(user, scopes)
                server.requests += 1
                self._answer(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": server.lifetime,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    },
                )

            def _user(self) -> str | None:
                kind, _, credentials = self.headers.get("Authorization", "").partition(" ")
                if kind.lower() != "basic":
                    return None
                try:
                    user, _, password = base64.b64decode(credentials).decode().partition(":")
                except ValueError:
                    return None
                return user if server.users.get(user) == password else None

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
