"""Stage 2: verify. The sender's identity token, checked against the trust bundle (caught up if it
names a key not known here yet), the contract's declared producers, the body's digest and the
message id; for a dead letter an operator re-drove, at its original's time and id, as the
operator's signed statement says."""

from __future__ import annotations

from mesh_contracts import Contract, schema_named
from mesh_identity import IdentityError, Principal
from mesh_kit import envelope as env
from mesh_kit.trust import Trust


def redrive(
    trust: Trust, subject: str, body: bytes, headers: dict[str, str], msg_id: str, stored_at: float | None
) -> tuple[float | None, str]:
    """When and under which message id a message's token is judged: when it was stored, under
    the id it arrived with; for a dead letter an operator re-drove, at the time its original
    was first stored, under the original's id, as the operator's signed statement says.
    Re-drive headers without a valid statement are an ``IdentityError``: whoever can publish
    on a subject must not be able to stretch a captured token's lifetime."""
    if not any(h in headers for h in (env.REDRIVE, env.REDRIVE_OF, env.ORIGINAL_STORED_AT)):
        return stored_at, msg_id
    try:
        statement = trust.verifier.redrive(
            headers.get(env.REDRIVE), subject=subject, body=body, msg_id=msg_id, at=stored_at
        )
    except IdentityError as exc:
        raise IdentityError(f"re-drive: {exc}") from None
    return min(statement.at, stored_at) if stored_at is not None else statement.at, statement.original_msg_id


async def sender(
    trust: Trust, model: Contract, body: bytes, headers: dict[str, str], *, at: float | None, msg_id: str
) -> Principal:
    """Who sent it, or ``IdentityError``: the token (and the budget facts it vouches for) judged
    at ``at`` under ``msg_id``; then ``ContractError`` unless its ``Mesh-Schema`` names what it is."""
    who = await trust.verify_current(
        lambda: trust.verifier.verify_with_facts(
            headers.get(env.IDENTITY), body, model, headers.get(env.FACTS), at=at, msg_id=msg_id
        )
    )
    schema_named(model.schema_id(), headers.get(env.SCHEMA, ""))
    return who
