"""Stage 1: decode. Where the message came from (delivery count, stream sequence, when stored) and
its body parsed against its contract by the bounded decoder (``mesh_contracts.decode``): a
hostile body (nesting thousands deep, a 5,000-digit integer, invalid UTF-8) is refused here,
before anything else reads it, with a reason the dead letter carries."""

from __future__ import annotations

from typing import Any

from nats.errors import NotJSMessageError

from mesh_contracts import BodyError, Contract, DecodeLimits, parse_message
from mesh_identity import IdentityError


def arrival(raw: Any) -> tuple[int, float | None, int]:
    """(deliveries, stored_at, stream sequence) of a JetStream message (1, None, 0 otherwise)."""
    try:
        md = raw.metadata
        return md.num_delivered, md.timestamp.timestamp(), md.sequence.stream
    except NotJSMessageError:
        return 1, None, 0


def decode(subject: str, body: bytes, limits: DecodeLimits, *, strict: bool) -> Contract:
    """The message as its contract, or ``ContractError`` (``BodyError`` for what the bounded
    decoder refused)."""
    return parse_message(subject, body, strict=strict, limits=limits)


def rejection(exc: Exception) -> str:
    """The dead letter's reason: ``decode: ...`` (the bounded decoder), ``contract: ...`` or ``identity: ...``."""
    if isinstance(exc, BodyError):
        return str(exc)
    return f"{'identity' if isinstance(exc, IdentityError) else 'contract'}: {exc}"
