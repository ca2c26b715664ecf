"""The tenant's content in an audit link, sealed to the tenant's auditor key (issue 42).

A link's ``detail`` holds facts of the mesh (ids, tools, decisions, digests) and, in the fields
``mesh_contracts.v1.audit.SEALED_DETAIL`` names, the tenant's own content. Whoever appends a link
seals each of those fields to the tenant's auditor key (X25519, a libsodium sealed box: an
ephemeral key per value, so a writer can seal and never open). The chain's hashes are over the
stored bytes, sealed values included, so ``meshctl audit verify`` needs no key. Erasing a tenant
destroys its auditor key: every sealed value of its chain is then unreadable, for good, while the
chain stays complete. A tenant the trust bundle holds no key for (erased) gets the field withheld.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from mesh_contracts.v1.audit import SEALED_DETAIL

SEALED = "sealed"
UNREADABLE = "(unreadable: sealed to another key; an erased tenant's key is destroyed)"
WITHHELD = "(withheld: the tenant has no key)"
CLOSED = "(sealed)"

Keys = Callable[[str], bytes | None]
"""The tenant's auditor public key (None: it has none, as after its erasure)."""


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEALED} and isinstance(value[SEALED], str)


def seal_detail(detail: dict[str, Any], public_key: bytes | None) -> dict[str, Any]:
    """``detail`` with every field of ``SEALED_DETAIL`` it has sealed to ``public_key`` (withheld
    when there is no key). The value sealed is its JSON, so any type comes back as it was."""
    if not any(k in detail for k in SEALED_DETAIL):
        return detail
    box = SealedBox(PublicKey(public_key)) if public_key else None
    out = dict(detail)
    for k in SEALED_DETAIL:
        if k in out and not is_sealed(out[k]):
            raw = json.dumps(out[k], separators=(",", ":"), sort_keys=True).encode()
            out[k] = {SEALED: base64.b64encode(box.encrypt(raw)).decode() if box is not None else ""}
    return out


def opener(private_key: bytes | None) -> SealedBox[PrivateKey] | None:
    return SealedBox(PrivateKey(private_key)) if private_key else None


def open_detail(detail: dict[str, Any], box: SealedBox[PrivateKey] | None) -> dict[str, Any]:
    """``detail`` with its sealed fields opened by ``box`` (the tenant's auditor key); a field it
    cannot open says why instead (no key at hand, the key destroyed, withheld at writing)."""
    out = dict(detail)
    for k, v in detail.items():
        if not is_sealed(v):
            continue
        if not v[SEALED]:
            out[k] = WITHHELD
        elif box is None:
            out[k] = CLOSED
        else:
            try:
                out[k] = json.loads(box.decrypt(base64.b64decode(v[SEALED])))
            except (CryptoError, ValueError, binascii.Error):
                out[k] = UNREADABLE
    return out
