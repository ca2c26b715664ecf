"""Signed identity tokens on every message (EdDSA JWTs made with pyjwt).

The broker's permissions stop a service from publishing where it must not; the token
stops a forged or altered message from being believed anywhere. A token names the
sending principal (``kid`` header and ``iss`` claim), the tenant, the message type, a
sha256 digest of the exact body bytes and a short validity window.

Expiry is checked against the time the broker *stored* the message (JetStream
metadata), not the time it is consumed: a backlog that waits out an outage stays valid,
while a captured token cannot be replayed into the stream later than its window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from mesh_contracts import facts as mesh_facts
from mesh_contracts.base import Contract, ContractError
from mesh_identity.bundle import TrustBundle
from mesh_identity.errors import IdentityError, UnknownKey
from mesh_identity.keys import (
    ALGORITHM,
    CLOCK_LEEWAY_S,
    DEFAULT_TTL_S,
    MAX_TOKEN_LIFETIME_S,
    OPERATOR_ROLES,
    REDRIVE_TTL_S,
    Principal,
    _raw,
    body_digest,
    facts_digest,
    load_private_key,
)  # fmt: skip
from mesh_identity.registry import Directory


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(segment: str) -> bytes:
    """A base64url segment in its one canonical form (no padding, no other alphabet, no stray
    bits: what PyJWT accepts); ``ValueError`` for anything else."""
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not canonical base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _b64(data) != segment.encode():
        raise ValueError("not canonical base64url")
    return data


def _jws(signing_key: SigningKey, header: bytes, claims: dict[str, Any]) -> str:
    """A compact EdDSA JWS (what ``jwt.encode`` makes, byte for byte in structure): ``header``
    is the already-encoded first segment. libsodium signs about 1.5x faster than OpenSSL's
    Ed25519 here, and the header is encoded once per signer instead of once per message."""
    signing_input = header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    return (signing_input + b"." + _b64(signing_key.sign(signing_input).signature)).decode()


VERIFIED_KEPT = 4096
"""Tokens a verifier remembers having checked (the oldest are forgotten first)."""

_CHECKED_ELSEWHERE = ("nbf", "aud", "jti")


class Signer:
    """Signs outgoing messages as one principal."""

    def __init__(self, principal: str, key: Ed25519PrivateKey, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.principal = principal
        self._key = key
        self._ttl_s = ttl_s
        self._signing_key = SigningKey(
            key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        )
        self._header = _b64(
            json.dumps({"alg": ALGORITHM, "kid": principal, "typ": "JWT"}, separators=(",", ":")).encode()
        )
        self._fingerprint_key = hmac.new(bytes(self._signing_key), b"mesh-facts-fingerprint", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, principal: str, path: str | Path, ttl_s: float = DEFAULT_TTL_S) -> Signer:
        return cls(principal, load_private_key(path), ttl_s)

    def statement(
        self, kind: str, claims: dict[str, Any], now: float | None = None, ttl_s: float = REDRIVE_TTL_S
    ) -> str:
        """A signed operator statement of ``kind`` (``typ``) with ``claims``."""
        now = time.time() if now is None else now
        body = {"iss": self.principal, "typ": kind, **claims, "iat": int(now), "exp": int(now + ttl_s)}
        return jwt.encode(body, self._key, algorithm=ALGORITHM, headers={"kid": self.principal})

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def redrive(
        self, *, subject: str, body: bytes, dlq_seq: int, original_stored_at: float, original_msg_id: str,
        msg_id: str, now: float | None = None,
    ) -> str:  # fmt: skip
        """An operator's signed statement that re-drives one dead letter: the body (by digest), where
        it goes, under which new message id, and the time its original token is to be judged at."""
        now = time.time() if now is None else now
        claims = {
            "iss": self.principal,
            "typ": "redrive",
            "sub": subject,
            "dig": body_digest(body),
            "dlq": dlq_seq,
            "at": original_stored_at,
            "omid": original_msg_id,
            "mid": msg_id,
            "iat": int(now),
            "exp": int(now + REDRIVE_TTL_S),
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.principal})

    def token(
        self, *, tenant: str, msg_type: str, body: bytes, msg_id: str = "", now: float | None = None,
        facts: str | None = None,
    ) -> str:  # fmt: skip
        """``facts``: the message's ``Mesh-Facts`` header, which the token then covers (``fct``)."""
        now = time.time() if now is None else now
        claims = {
            "iss": self.principal,
            "ten": tenant,
            "typ": msg_type,
            "dig": body_digest(body),
            "mid": msg_id,
            "iat": int(now),
            "exp": int(now + self._ttl_s),
        }
        if facts is not None:
            claims["fct"] = facts_digest(facts)
        return _jws(self._signing_key, self._header, claims)

    def fingerprint(self, value: Any) -> str:
        """A keyed digest of ``value`` (a content signature in a message's facts): equal for equal
        values from this principal, which every replica of a service shares, and no use to anyone
        without its key for confirming a guess of the value (the budget compares them only). The
        key is derived from the signing key, so it changes with a rotation."""
        return hmac.new(self._fingerprint_key, mesh_facts.canonical(value), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Redrive:
    """A verified re-drive statement: judge the message's token at ``at``, bound to ``original_msg_id``."""

    operator: str
    at: float
    original_msg_id: str
    dlq_seq: int


class Verifier:
    """Checks a message's token against the trust bundle and the contract's producers."""

    def __init__(
        self, bundle: TrustBundle, leeway_s: float = CLOCK_LEEWAY_S, max_lifetime_s: float = MAX_TOKEN_LIFETIME_S
    ) -> None:
        self.bundle = bundle
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self._verify_keys: dict[int, tuple[Ed25519PublicKey, VerifyKey]] = {}
        self.fast = True
        """False: every token goes through PyJWT alone (the tests hold the two paths to one verdict)."""
        self.tenants = bundle.directory or Directory(lambda: self.bundle, leeway_s)
        """The tenants added at runtime this process has met (``mesh_identity.registry``): the
        bundle's lookups fall back to it (a bundle that has one keeps it: a verifier made to judge
        one record or one published bundle must not take the process's away)."""
        if bundle.directory is None:
            bundle.attach(self.tenants)
        self._verified: OrderedDict[str, tuple[Principal, dict[str, Any], Ed25519PublicKey]] = OrderedDict()
        """Tokens whose signature this process checked lately, with the key that checked it: the
        same message read twice in one process (the budget's monitor and its usage consumer) is
        not checked twice. A hit counts only while the bundle still holds that principal and the
        key is valid at the message's own time; every claim is still checked for the message."""

    def _verify_key(self, key: Ed25519PublicKey) -> VerifyKey:
        """libsodium's handle on a bundle key, made once per key object (the bundle's keys live as
        long as the bundle; a new bundle brings new objects)."""
        cached = self._verify_keys.get(id(key))
        if cached is None or cached[0] is not key:
            if len(self._verify_keys) > 4096:  # many bundle reloads: start over
                self._verify_keys.clear()
            cached = self._verify_keys[id(key)] = (key, VerifyKey(_raw(key)))
        return cached[1]

    def _fast_decode(
        self, token: str, require: list[str], what: str, at: float | None
    ) -> tuple[Principal, dict[str, Any]] | None:
        """``_decode`` for a well-formed EdDSA token: the signature checked with libsodium (about
        2x faster than OpenSSL's Ed25519 here) and the token parsed once instead of twice. None
        when the token is anything else (malformed, another algorithm, a claim PyJWT checks):
        PyJWT then decides, and says why it refuses."""
        hit = self._verified.get(token)
        if hit is not None:
            known, known_claims, known_key = hit
            if (
                self.bundle.principals.get(known.name) is known
                and any(k is known_key for k in known.keys_at(time.time() if at is None else at, self.leeway_s))
                and not any(known_claims.get(c) is None for c in require)
            ):
                return known, known_claims
        try:
            header_b64, payload_b64, sig_b64 = token.split(".")
            header = json.loads(_unb64(header_b64))
            claims = json.loads(_unb64(payload_b64))
            signature = _unb64(sig_b64)
        except (ValueError, TypeError):
            return None
        if not (isinstance(header, dict) and isinstance(claims, dict)) or header.get("alg") != ALGORITHM:
            return None
        if "crit" in header or "b64" in header:
            return None
        if len(signature) != 64 or any(c in claims for c in _CHECKED_ELSEWHERE):
            return None
        if not isinstance(claims.get("sub", ""), str) or any(claims.get(c) is None for c in require):
            return None
        name = header.get("kid")
        principal = self.bundle.principals.get(name) if isinstance(name, str) else None
        if principal is None:
            return None
        signing_input = f"{header_b64}.{payload_b64}".encode()
        keys = principal.keys_at(time.time() if at is None else at, self.leeway_s)
        for key in keys:
            try:
                self._verify_key(key).verify(signing_input, signature)
            except BadSignatureError:
                continue
            if claims["iss"] != name:
                raise IdentityError(f"{what} issuer {claims['iss']!r} does not match key id {name!r}")
            self._verified[token] = (principal, claims, key)
            if len(self._verified) > VERIFIED_KEPT:
                self._verified.popitem(last=False)
            return principal, claims
        why = "forged, or signed with a retired key" if len(keys) < len(principal.keys) else "forged?"
        raise UnknownKey(f"{what} signature invalid for {name} ({why})")

    def _decode(
        self, token: str, require: list[str], what: str = "identity token", at: float | None = None
    ) -> tuple[Principal, dict[str, Any]]:
        """The token's principal (by ``kid``, from the bundle) and its claims, the signature checked
        against the principal's keys that were valid at ``at`` (now by default): during a rotation
        the old key and the new one; afterwards the retired key only for what was stored before."""
        fast = self._fast_decode(token, require, what, at) if self.fast and isinstance(token, str) else None
        if fast is not None:
            return fast
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise IdentityError(f"{what} unreadable: {exc}") from None
        name = header.get("kid")
        principal = self.bundle.principals.get(name) if isinstance(name, str) else None
        if principal is None:
            raise UnknownKey(f"{what} from unknown principal {name!r}")
        keys = principal.keys_at(time.time() if at is None else at, self.leeway_s)
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[ALGORITHM],
                    options={"verify_exp": False, "verify_iat": False, "require": require},
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise IdentityError(f"{what} invalid: {exc}") from None
        if claims is None:
            why = "forged, or signed with a retired key" if len(keys) < len(principal.keys) else "forged?"
            raise UnknownKey(f"{what} signature invalid for {name} ({why})")
        if claims["iss"] != name:
            raise IdentityError(f"{what} issuer {claims['iss']!r} does not match key id {name!r}")
        return principal, claims

    def statement(
        self, token: str, *, kind: str, roles: tuple[str, ...], require: list[str], at: float | None = None
    ) -> tuple[Principal, dict[str, Any]]:
        """A signed statement of ``kind`` (``Signer.statement``) by one of ``roles``, judged at
        ``at`` (when it was stored: a retired key still vouches for what it signed before)."""
        principal, claims = self._decode(token, ["iss", "typ", "iat", *require], f"{kind} statement", at)
        if claims["typ"] != kind:
            raise IdentityError(f"a {claims['typ']!r} statement, not {kind!r}")
        if principal.role not in roles:
            raise IdentityError(f"{principal.name} may not sign {kind} statements ({', '.join(roles)} only)")
        return principal, claims

    def redrive(
        self, statement: str | None, *, subject: str, body: bytes, msg_id: str, at: float | None = None
    ) -> Redrive:
        """Verify an operator's re-drive statement for a message stored at ``at`` on ``subject``
        under ``msg_id``: who made it, that it covers exactly this body, subject and message id,
        and that it was fresh when the message was stored. Anyone else's re-drive headers are
        an ``IdentityError``."""
        if not statement:
            raise IdentityError("re-drive headers without an operator's signed re-drive statement (forged re-drive?)")
        principal, claims = self._decode(
            statement, ["iss", "typ", "sub", "dig", "at", "omid", "mid", "iat", "exp"], "re-drive statement", at
        )
        if principal.role not in OPERATOR_ROLES:
            raise IdentityError(f"{principal.name} may not re-drive messages (operators only)")
        now = time.time() if at is None else at
        if claims["typ"] != "redrive":
            raise IdentityError("not a re-drive statement")
        if claims["exp"] < now - self.leeway_s or claims["iat"] > now + self.leeway_s:
            raise IdentityError("re-drive statement not valid at the time the message was stored")
        if (claims["sub"], claims["dig"], claims["mid"]) != (subject, body_digest(body), msg_id):
            raise IdentityError("re-drive statement is for another message (subject, body or message id differ)")
        return Redrive(principal.name, float(claims["at"]), str(claims["omid"]), int(claims.get("dlq", 0)))

    def verify_forwarded(
        self, token: str | None, body: bytes, model: Contract, *, not_before: float, not_after: float
    ) -> Principal:
        """Verify a message handed on inside another one (``SignedRecord``), as of when it was
        signed: its token's ``iat`` must fall in ``[not_before, not_after]`` (the task's lifetime,
        from what the forwarding message's own trusted producer says), and the key must have been
        valid then. A record does not expire on its way; a key retired before it was signed, or
        revoked, still refuses it, and so does a signing time outside the window (a record from
        another task, or one back-dated with a retired key before the task existed)."""
        if not token:
            raise IdentityError("identity token missing")
        try:
            iat = float(jwt.decode(token, options={"verify_signature": False}).get("iat", 0))
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise IdentityError(f"unreadable identity token: {exc}") from None
        if iat < not_before - self.leeway_s or iat > not_after + self.leeway_s:
            raise IdentityError("signed outside the task's lifetime (a record of another task, or back-dated)")
        return self.verify(token, body, model, at=iat)

    def verify(
        self, token: str | None, body: bytes, model: Contract, *, at: float | None = None, msg_id: str | None = None
    ) -> Principal:
        """Return the sending principal, or raise ``IdentityError`` saying why not.

        ``at`` is when the message entered the broker (defaults to now). ``msg_id``, when given,
        is the id the message arrived under: the token must have been issued for it.
        """
        return self._checked(token, body, model, at, msg_id)[0]

    def verify_with_facts(
        self, token: str | None, body: bytes, model: Contract, facts: str | None, *, at: float | None = None,
        msg_id: str | None = None,
    ) -> Principal:  # fmt: skip
        """``verify``, and the message's ``Mesh-Facts`` header (``facts``) as well: covered by the
        token when the token says it is (``fct``), absent otherwise, and saying of the body what
        the body says (``ContractError`` if not: what the budget is told of a message is what its
        consumers are given)."""
        principal, claims = self._checked(token, body, model, at, msg_id)
        self._facts_covered(claims, facts)
        if facts is not None and (key := mesh_facts.disagree(facts, model)) is not None:
            raise ContractError(f"facts: the {mesh_facts.HEADER} header's {key!r} is not the body's")
        return principal

    def verify_envelope(
        self, token: str | None, facts: str | None, contract: type[Contract], tenant: str, *, at: float | None = None
    ) -> tuple[Principal, mesh_facts.Facts]:
        """A message known by its headers alone (the ENVELOPES stream holds no body): its token,
        checked as ``verify`` checks it but for the body's digest, which it cannot be, and the
        facts that token covers. A token that covers none (a producer of an earlier release, a
        client that does not send them) gives no facts: the message is known by its type."""
        if not token:
            raise IdentityError("identity token missing")
        principal, claims = self._decode(token, ["iss", "ten", "typ", "dig", "iat", "exp"], at=at)
        self._entitled(principal, claims, contract.type_name(), tenant, contract.spec.producers, at, None)
        self._facts_covered(claims, facts)
        return principal, mesh_facts.decode(facts) if "fct" in claims else {}

    def _checked(
        self, token: str | None, body: bytes, model: Contract, at: float | None, msg_id: str | None
    ) -> tuple[Principal, dict[str, Any]]:
        if not token:
            raise IdentityError("identity token missing")
        principal, claims = self._decode(token, ["iss", "ten", "typ", "dig", "iat", "exp"], at=at)
        if claims["dig"] != body_digest(body):
            raise IdentityError("body does not match the identity token's digest (altered in transit?)")
        self._entitled(principal, claims, model.type, model.tenant, model.spec.producers, at, msg_id)
        return principal, claims

    def _entitled(
        self, principal: Principal, claims: dict[str, Any], msg_type: str, tenant: str, producers: tuple[str, ...],
        at: float | None, msg_id: str | None,
    ) -> None:  # fmt: skip
        """Everything a token must say of a message but its body: valid when it was stored, for
        its type, tenant and id, from a principal that may produce it and speak for the tenant."""
        name = principal.name
        at = time.time() if at is None else at
        if claims["exp"] < at - self.leeway_s:
            raise IdentityError(f"identity token expired {at - claims['exp']:.0f}s before the message was stored")
        if claims["iat"] > at + self.leeway_s:
            raise IdentityError("identity token issued in the future")
        if claims["exp"] - claims["iat"] > self.max_lifetime_s:
            raise IdentityError(
                f"identity token valid for {claims['exp'] - claims['iat']:.0f}s, over the {self.max_lifetime_s:.0f}s "
                "a token may live (a long-lived token could be replayed after the deduplication window)"
            )
        if claims["typ"] != msg_type:
            raise IdentityError(f"token was issued for {claims['typ']}, message is {msg_type}")
        if claims["ten"] != tenant:
            raise IdentityError(f"token was issued for tenant {claims['ten']!r}, message is for {tenant!r}")
        if msg_id is not None and claims.get("mid", "") != msg_id:
            raise IdentityError(
                f"token was issued for message id {claims.get('mid', '')!r}, not {msg_id!r} (a replay under a new id?)"
            )
        if principal.role not in producers:
            raise IdentityError(f"{name} may not produce {msg_type} (producers: {', '.join(producers)})")
        # A principal bound to a tenant (a tenant's client, a tenant's approver) speaks for it alone.
        if principal.tenant is not None and principal.tenant != tenant:
            raise IdentityError(f"{name} may speak only for tenant {principal.tenant!r}, not {tenant!r}")

    @staticmethod
    def _facts_covered(claims: dict[str, Any], facts: str | None) -> None:
        """The ``Mesh-Facts`` header is what the token says it is, or absent if it says nothing."""
        covered = claims.get("fct")
        if covered is None:
            if facts is not None:
                raise IdentityError(f"{mesh_facts.HEADER} header not covered by the identity token (added in transit?)")
            return
        if facts is None or facts_digest(facts) != covered:
            raise IdentityError(f"{mesh_facts.HEADER} header does not match the identity token (altered in transit?)")


def signed_bundle(bundle: TrustBundle, operator: Signer) -> bytes:
    """``bundle`` as an operator publishes it (the ``trust`` bucket): the bundle and a token over
    its digest and revision, signed by an operator."""
    body = bundle.dump().encode()
    return json.dumps({"bundle": body.decode(), "token": operator.statement("trust-bundle", {
        "dig": body_digest(body), "rev": bundle.revision})}).encode()  # fmt: skip


def accepted_bundle(current: TrustBundle, document: bytes, leeway_s: float = CLOCK_LEEWAY_S) -> TrustBundle:
    """The bundle in ``document`` if one of ``current``'s operators signed it (with a key still
    active) and it is newer than ``current``; ``IdentityError`` otherwise. Trust is a chain: each
    published bundle is vouched for by the one before it."""
    try:
        doc = json.loads(document)
        body, token = doc["bundle"].encode(), doc["token"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IdentityError(f"trust bundle document unreadable: {exc}") from None
    principal, claims = Verifier(current, leeway_s)._decode(token, ["iss", "typ", "dig", "rev", "iat"], "bundle token")
    if principal.role not in OPERATOR_ROLES:
        raise IdentityError(f"{principal.name} may not publish trust bundles (operators only)")
    if claims["typ"] != "trust-bundle" or claims["dig"] != body_digest(body):
        raise IdentityError("bundle token does not cover this bundle")
    new = TrustBundle.from_json(body)
    if new.revision != claims["rev"] or new.revision <= current.revision:
        raise IdentityError(f"trust bundle revision {new.revision} is not newer than {current.revision}")
    return new
