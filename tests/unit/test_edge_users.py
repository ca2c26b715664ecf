"""The edge's sign-in: a person's JWT verified against the identity provider's keys, given as a
PEM file, a JWKS file or the provider's JWKS URL (a real HTTP server here), and the tenant claim
read; everything else refused with a reason."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_edge.settings import EdgeSettings
from mesh_edge.users import Forbidden, Unauthorized, Users

pytestmark = pytest.mark.unit

CLAIMS = {"iss": "https://idp.example", "aud": "agentmesh-edge", "sub": "alice", "tenant": "acme"}
"""A token's claims but its times, which each signing adds as of then (a suite runs for minutes)."""


def _jwk(key: object, kid: str, alg: str) -> dict[str, object]:
    jwk: dict[str, object] = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key))  # type: ignore[attr-defined]
    return {**jwk, "kid": kid, "use": "sig", "alg": alg}


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {
        "ed": Ed25519PrivateKey.generate(),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture(scope="module")
def jwks(keys) -> dict[str, object]:
    return {"keys": [_jwk(keys["rsa"].public_key(), "r1", "RS256"), _jwk(keys["ec"].public_key(), "e1", "ES256")]}


@pytest.fixture(scope="module")
def jwks_url(jwks) -> Iterator[str]:
    body = json.dumps(jwks).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


def _bearer(claims: dict[str, object], key: object, alg: str, kid: str | None = None) -> str:
    """Signed now: ``exp`` a minute from now unless ``claims`` say when (``exp`` / ``nbf`` as
    offsets in seconds from now)."""
    now = int(time.time())
    timed = {**claims, "exp": now + int(claims.get("exp", 60))}  # type: ignore[call-overload]
    if "nbf" in claims:
        timed["nbf"] = now + int(claims["nbf"])  # type: ignore[call-overload]
    return "Bearer " + jwt.encode(timed, key, algorithm=alg, headers={"kid": kid} if kid else None)


def test_a_pem_file_of_the_providers_keys(keys, tmp_path: Path) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(b"".join(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
                             for k in (keys["ed"], keys["rsa"])))  # fmt: skip
    users = Users(EdgeSettings(issuer="https://idp.example", issuer_keys_file=pem))
    for key, alg in ((keys["ed"], "EdDSA"), (keys["rsa"], "RS256")):
        user = users.verify(_bearer(CLAIMS, key, alg))
        assert (user.subject, user.tenant) == ("alice", "acme")
    with pytest.raises(Unauthorized, match="invalid token"):
        users.verify(_bearer(CLAIMS, keys["ec"], "ES256"))  # a key the provider does not have
    with pytest.raises(Unauthorized, match="issuer"):
        users.verify(_bearer({**CLAIMS, "iss": "https://evil.example"}, keys["ed"], "EdDSA"))


def test_a_jwks_file_and_the_providers_jwks_url(keys, jwks, jwks_url, tmp_path: Path) -> None:
    file = tmp_path / "jwks.json"
    file.write_text(json.dumps(jwks))
    for settings in (EdgeSettings(issuer_keys_file=file), EdgeSettings(jwks_url=jwks_url)):
        users = Users(settings)
        assert users.verify(_bearer(CLAIMS, keys["rsa"], "RS256", "r1")).tenant == "acme"
        assert users.verify(_bearer(CLAIMS, keys["ec"], "ES256", "e1")).subject == "alice"
        with pytest.raises(Unauthorized):
            users.verify(_bearer(CLAIMS, keys["ed"], "EdDSA", "r1"))


@pytest.mark.parametrize(
    ("claims", "error", "says"),
    [
        ({**CLAIMS, "exp": -120}, Unauthorized, "expired"),
        ({**CLAIMS, "nbf": 600}, Unauthorized, "not yet valid"),
        ({**CLAIMS, "aud": "someone-else"}, Unauthorized, "(?i)audience"),
        ({k: v for k, v in CLAIMS.items() if k != "sub"}, Unauthorized, "sub"),
        ({k: v for k, v in CLAIMS.items() if k != "tenant"}, Forbidden, "names no tenant"),
        ({**CLAIMS, "tenant": "Acme; DROP"}, Forbidden, "names no tenant"),
        ({**CLAIMS, "tenant": ["acme"]}, Forbidden, "names no tenant"),
    ],
)
def test_what_is_refused_and_why(keys, tmp_path: Path, claims, error, says) -> None:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(keys["ed"].public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    users = Users(EdgeSettings(issuer_keys_file=pem, leeway_s=0))
    with pytest.raises(error, match=says):
        users.verify(_bearer(claims, keys["ed"], "EdDSA"))
    for header in (None, "", "Basic YWxpY2U6cHc=", "Bearer"):
        with pytest.raises(Unauthorized, match="Bearer"):
            users.verify(header)


def test_an_edge_that_trusts_no_provider_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trusts no identity provider"):
        Users(EdgeSettings())
    empty = tmp_path / "none.pem"
    empty.write_text("not a key")
    with pytest.raises(ValueError, match="no public key"):
        Users(EdgeSettings(issuer_keys_file=empty))
