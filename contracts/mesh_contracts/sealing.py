"""Tenant content sealed at rest (issue 42): which fields, in what form, and the one place a body
is sealed and opened.

Each contract names the fields that carry a tenant's own content (``ContractSpec.sealed``: the
goal, the answer, step instructions and outputs, tool arguments and results, retrieved passages,
documents...) and so does each record (``Record.sealed``). When the process has a data keyring
installed (``install``: every service with ``MESH_DATA_KEY_FILE``, and ``meshctl``), a body is
written with each of those fields replaced by ``{"$sealed": "dk1.<kid>.<base64url>"}``: the
field's JSON, encrypted with the tenant's own data key (XChaCha20-Poly1305), bound to the message
type, the tenant and the task by its associated data, so a sealed value moved into another
message, another task or another tenant's does not open. Everything else stays clear: the ids,
subjects, statuses, counts, costs, digests the mesh routes, budgets and audits by.

The identity token signs the bytes as sent (sealed), so a message keeps its signature and its
verification needs no key. Reading opens whatever is sealed before validation, with the bounded
decoder's limits; a process without the tenant's key refuses the body with the reason
(``SealError``, a ``ContractError``: a dead letter that says so).

Without a keyring nothing is sealed, and a sealed body cannot be read: the key decides, not a flag.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from mesh_contracts.errors import ContractsError

MARK = "$sealed"
"""The one key of the object a sealed field's value becomes."""
PREFIX = "dk1."
"""Version of the sealed form: ``dk1.<key id>.<base64url of nonce + ciphertext>``."""


class SealError(ValueError, ContractsError):
    """A field that could not be sealed (the tenant has no data key) or opened (no key here, the
    key destroyed by an erasure, or the value altered or moved); the message says which."""


class Sealer(Protocol):
    """What seals and opens a tenant's content (``mesh_identity.datakeys.Keyring``)."""

    def seal(self, tenant: str, aad: bytes, plaintext: bytes) -> str: ...

    def open(self, tenant: str, aad: bytes, token: str) -> bytes: ...


BLOB = b"dk1b"
"""A sealed blob (an index's document, a cache entry): ``dk1b`` + the sealed form as ASCII."""


def seal_blob(tenant: str, aad: str, data: bytes) -> bytes:
    """``data`` sealed to ``tenant``'s data key (as it is, without a keyring)."""
    sealer = _sealer
    return data if sealer is None else BLOB + sealer.seal(tenant, aad.encode(), data).encode()


def open_blob(tenant: str, aad: str, data: bytes) -> bytes:
    """``data`` opened if sealed (``SealError`` if it does not open here)."""
    if not data.startswith(BLOB + PREFIX.encode()):
        return data
    sealer = _sealer
    if sealer is None:
        raise SealError(f"sealed with tenant {tenant!r}'s data key and this process holds no data keys")
    return sealer.open(tenant, aad.encode(), data[len(BLOB) :].decode("ascii"))


_sealer: Sealer | None = None


def install(sealer: Sealer | None) -> None:
    """Seal and open with ``sealer`` in this process from now on (None: write clear, and refuse
    to read what is sealed)."""
    global _sealer
    _sealer = sealer


def installed() -> Sealer | None:
    return _sealer


def is_sealed(value: Any) -> bool:
    return (
        type(value) is dict and len(value) == 1 and isinstance(value.get(MARK), str) and value[MARK].startswith(PREFIX)
    )


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {} or value == ()


def seal_fields(value: dict[str, Any], names: tuple[str, ...], tenant: str, context: str) -> dict[str, Any]:
    """``value`` with each field of ``names`` sealed to ``tenant``'s data key (an empty value stays
    as it is: it says nothing and costs nothing). ``context`` (type, tenant, task) is the
    associated data, with the field's name."""
    sealer = _sealer
    if sealer is None or not names:
        return value
    out = dict(value)
    for name in names:
        v = out.get(name)
        if _empty(v) or is_sealed(v):
            continue
        raw = json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()
        out[name] = {MARK: sealer.seal(tenant, f"{context}|{name}".encode(), raw)}
    return out


def open_fields(value: Any, tenant: str, context: str, decode: Any) -> Any:
    """``value`` with every sealed field opened (``decode``: the bounded decoder for what a field
    held), or ``SealError`` saying why one would not open."""
    if type(value) is not dict:
        return value
    sealed = [k for k, v in value.items() if is_sealed(v)]
    if not sealed:
        return value
    sealer = _sealer
    if sealer is None:
        raise SealError(
            f"field(s) {', '.join(sealed)} are sealed with tenant {tenant!r}'s data key and this process "
            "holds no data keys (MESH_DATA_KEY_FILE)"
        )
    out = dict(value)
    for k in sealed:
        plain = sealer.open(tenant, f"{context}|{k}".encode(), value[k][MARK])
        out[k] = decode(plain)
    return out


def dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
