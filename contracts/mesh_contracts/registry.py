"""Lookup of contracts by type, version and subject."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mesh_contracts import sealing
from mesh_contracts.base import POOL_PATTERN, Contract, ContractError, field_decoder
from mesh_contracts.decode import DEFAULT_LIMITS, DecodeError, DecodeLimits
from mesh_contracts.v1 import ALL as V1

# Every published major version. A v2 module adds its ``ALL`` here; consumers then accept both.
VERSIONS: dict[int, tuple[type[Contract], ...]] = {1: V1}

BY_TYPE: dict[tuple[str, int], type[Contract]] = {
    (c.type_name(), major): c for major, cs in VERSIONS.items() for c in cs
}
BY_SUBJECT_KEY: dict[tuple[str, int, str], type[Contract]] = {
    (c.spec.domain, major, c.spec.event): c for major, cs in VERSIONS.items() for c in cs
}


@dataclass(frozen=True)
class SubjectParts:
    """The tokens of ``<domain>.v<major>.<tenant>.<task>.<event>[.<pool>]``."""

    domain: str
    major: int
    tenant: str
    task_id: str
    event: str
    pool: str = ""
    """The worker pool the message is routed to (``Contract.routed_to``), '' when none."""


def split_subject(subject: str) -> SubjectParts:
    """Parse a mesh subject; raises ``ContractError`` if it is not of the mesh's shape."""
    tokens = subject.split(".")
    if len(tokens) not in (5, 6) or not tokens[1].startswith("v") or not tokens[1][1:].isdigit():
        raise ContractError(f"subject {subject!r} is not <domain>.v<major>.<tenant>.<task>.<event>")
    pool = tokens[5] if len(tokens) == 6 else ""
    if len(tokens) == 6 and not (pool and re.fullmatch(POOL_PATTERN, pool)):
        raise ContractError(f"subject {subject!r}: {pool!r} is not a worker pool's name")
    return SubjectParts(tokens[0], int(tokens[1][1:]), tokens[2], tokens[3], tokens[4], pool)


def contract_for_subject(subject: str) -> type[Contract]:
    """The contract class for a concrete subject, or ``ContractError`` naming what is known."""
    parts = split_subject(subject)
    cls = BY_SUBJECT_KEY.get((parts.domain, parts.major, parts.event))
    if cls is None:
        known = sorted(f"v{m}" for (d, m, e) in BY_SUBJECT_KEY if (d, e) == (parts.domain, parts.event))
        if known:
            raise ContractError(
                f"unknown contract version v{parts.major} for {parts.domain}.{parts.event} "
                f"(this consumer knows {', '.join(known)})"
            )
        raise ContractError(f"no contract for subject {subject!r}")
    return cls


def schema_named(expected: str, header: str) -> None:
    """``ContractError`` unless a message's ``Mesh-Schema`` header is ``expected`` (it names the
    contract and its version; a client that sends none, or another, is told which it must be)."""
    if header != expected:
        raise ContractError(f"header Mesh-Schema is {header!r}, this message is a {expected}" if header
                            else f"header Mesh-Schema is missing: this message is a {expected}")  # fmt: skip


def parse_message(
    subject: str, data: bytes, *, strict: bool = False, limits: DecodeLimits = DEFAULT_LIMITS, schema: str | None = None
) -> Contract:
    """Decode a message body by its subject (bounded) and check the body agrees with the subject;
    given ``schema`` (its ``Mesh-Schema`` header, '' when it has none), that it names the contract
    the subject carries, version included: a message that says it is something else is refused
    before its body is read."""
    cls = contract_for_subject(subject)
    if schema is not None and schema != cls.schema_id():
        raise ContractError(
            f"header Mesh-Schema is {schema or 'missing'!r}: a message on {subject} is a {cls.schema_id()}"
        )
    model = cls.parse(data, strict=strict, limits=limits)
    parts = split_subject(subject)
    if (model.tenant, model.task_id) != (parts.tenant, parts.task_id):
        raise ContractError(
            f"body names tenant/task {model.tenant}/{model.task_id} but subject names {parts.tenant}/{parts.task_id}"
        )
    if model.routed_to() != parts.pool:
        raise ContractError(f"body goes to worker pool {model.routed_to()!r} but subject names {parts.pool!r}")
    return model


def open_body(subject: str, data: bytes) -> Any:
    """A stored message's body as JSON with its sealed fields opened, not validated (for tools that
    show messages as they are); a field that does not open here (no key, the tenant erased) is
    shown as the reason it does not."""
    value = json.loads(data)
    if b'"$sealed"' not in data or not isinstance(value, dict):
        return value
    cls = contract_for_subject(subject)
    tenant, context = str(value.get("tenant")), cls.seal_context(value)
    out = dict(value)
    for k, v in value.items():
        if sealing.is_sealed(v):
            try:
                out[k] = sealing.open_fields({k: v}, tenant, context, field_decoder())[k]
            except (sealing.SealError, DecodeError) as exc:
                out[k] = f"(sealed: {exc})"
    return out
