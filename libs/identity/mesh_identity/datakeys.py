"""Each tenant's data key, wrapped by the deployment's data key (envelope encryption, issue 42).

- A tenant's **data key** (32 random bytes) seals its content at rest (``mesh_contracts.sealing``).
  Its id is the first 8 bytes of its SHA-256, in hex.
- The **deployment's data key** (``secrets/data.key``; mounted by every service as
  ``MESH_DATA_KEY_FILE``) wraps each tenant's: the trust bundle carries the wrapped keys
  (``TrustBundle.data_keys``), so they reach every service, and follow every change, the way
  public keys do, while only a holder of the deployment key can unwrap them.
- **Erasure** removes the tenant's wrapped key from the bundle (and destroys every other copy):
  whatever of its content is left anywhere (a stream's blocks on disk before compaction, a backup,
  a chain that refuses deletes) stays sealed for good.

Sealing is XChaCha20-Poly1305 (libsodium) with a synthetic nonce: a keyed BLAKE2b of the
associated data and the plaintext. The same value sealed twice in the same place gives the same
bytes (a message re-published after a crash is byte for byte the one its token signed), different
values never share a nonce, and equal values in one place are the only thing it lets a reader of
the ciphertext compare.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from mesh_contracts.sealing import PREFIX, SealError

KEY_BYTES = 32
NONCE_BYTES = 24


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def read_key_file(path: str | Path) -> bytes:
    """A key file: 64 hex characters (as ``meshctl`` writes them)."""
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except ValueError:
        raise SealError(f"{path}: not a data key (64 hex characters)") from None
    if len(key) != KEY_BYTES:
        raise SealError(f"{path}: a data key is {KEY_BYTES} bytes, this one {len(key)}")
    return key


def wrap(deployment_key: bytes, tenant: str, data_key: bytes) -> str:
    """``<kid>.<base64url(nonce + ciphertext)>``: ``data_key`` sealed with the deployment's key,
    bound to ``tenant`` (a wrapped key moved to another tenant does not unwrap)."""
    kid = key_id(data_key)
    nonce = os.urandom(NONCE_BYTES)
    ct = crypto_aead_xchacha20poly1305_ietf_encrypt(data_key, f"dk1|{tenant}|{kid}".encode(), nonce, deployment_key)
    return f"{kid}.{_b64(nonce + ct)}"


def unwrap(deployment_key: bytes, tenant: str, wrapped: str) -> bytes:
    kid, _, blob = wrapped.partition(".")
    try:
        raw = _unb64(blob)
        key = crypto_aead_xchacha20poly1305_ietf_decrypt(
            raw[NONCE_BYTES:], f"dk1|{tenant}|{kid}".encode(), raw[:NONCE_BYTES], deployment_key
        )
    except (CryptoError, ValueError, binascii.Error):
        raise SealError(
            f"tenant {tenant!r}'s data key does not unwrap with this deployment's data key (another deployment's, "
            "or altered)"
        ) from None
    if key_id(key) != kid:
        raise SealError(f"tenant {tenant!r}'s wrapped data key is not the key its id names")
    return key


class Keyring:
    """Seals and opens tenants' content (``mesh_contracts.sealing.Sealer``) with the data keys the
    trust bundle of the moment carries (``wrapped``: tenant -> wrapped key), unwrapped with the
    deployment's key once each."""

    def __init__(self, deployment_key: bytes, wrapped: Callable[[], Mapping[str, str]]) -> None:
        self._kek = deployment_key
        self._wrapped = wrapped
        self._cache: dict[tuple[str, str], tuple[str, bytes, bytes]] = {}

    def key(self, tenant: str) -> tuple[str, bytes, bytes] | None:
        """(id, key, nonce key) of ``tenant``'s data key, or None when it has none here."""
        w = self._wrapped().get(tenant)
        if w is None:
            return None
        got = self._cache.get((tenant, w))
        if got is None:
            key = unwrap(self._kek, tenant, w)
            got = (key_id(key), key, hashlib.blake2b(b"mesh-seal-nonce", key=key, digest_size=32).digest())
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[(tenant, w)] = got
        return got

    def seal(self, tenant: str, aad: bytes, plaintext: bytes) -> str:
        got = self.key(tenant)
        if got is None:
            raise SealError(
                f"tenant {tenant!r} has no data key (erased, or not provisioned: meshctl up): its content is not written"
            )
        kid, key, nonce_key = got
        nonce = hashlib.blake2b(aad + b"\0" + plaintext, key=nonce_key, digest_size=NONCE_BYTES).digest()
        return f"{PREFIX}{kid}.{_b64(nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key))}"

    def open(self, tenant: str, aad: bytes, token: str) -> bytes:
        kid, _, blob = token[len(PREFIX) :].partition(".")
        got = self.key(tenant)
        if got is None or got[0] != kid:
            raise SealError(
                f"sealed with data key {kid} of tenant {tenant!r}, which this process does not hold "
                "(the tenant was erased, or this is another deployment's)"
            )
        try:
            raw = _unb64(blob)
            return crypto_aead_xchacha20poly1305_ietf_decrypt(raw[NONCE_BYTES:], aad, raw[:NONCE_BYTES], got[1])
        except (CryptoError, ValueError, binascii.Error):
            raise SealError(
                f"a field sealed with tenant {tenant!r}'s data key does not open here: altered, or moved from "
                "another message, task or tenant"
            ) from None
