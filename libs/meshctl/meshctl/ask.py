"""Operators ask the services what they see: a core request signed as the admin, whose answer
is verified against the trust bundle like any other message (``budget.status`` today).

It goes over NATS, not to a service's HTTP ``/status``, so it works against any deployment
(``meshctl top`` and ``meshctl status`` on a cluster, not only on ``meshctl up``'s processes).
"""

from __future__ import annotations

import uuid
from typing import Any

import nats

from mesh_contracts import Contract, ContractError
from mesh_contracts.registry import BY_TYPE
from mesh_contracts.v1 import BudgetStatusReport, BudgetStatusRequested
from mesh_contracts.v1.audit import MESH_WIDE
from mesh_kit import envelope as env
from mesh_kit.identity import IdentityError, Signer, Verifier


class AskError(Exception):
    """An answer came that is not what it claims (its reason says why): not believed."""


async def ask(nc: Any, signer: Signer, verifier: Verifier, question: Contract, *, timeout: float = 2.0) -> Contract:
    """Send ``question`` (a ``request`` contract) and return the verified answer. Raises
    ``nats.errors.TimeoutError`` / ``NoRespondersError`` when nobody answers, ``ContractError`` or
    ``IdentityError`` for an answer that is not what it claims."""
    body = question.to_bytes()
    msg_id = env.message_id(question.type, question.tenant, question.task_id, uuid.uuid4().hex[:16])
    reply = await nc.request(
        question.subject(), body, timeout=timeout, headers=env.headers_for(signer, question, body, msg_id)
    )
    headers = dict(reply.headers or {})
    type_name, _, major = headers.get(env.SCHEMA, "").partition("/v")
    cls = BY_TYPE.get((type_name, int(major) if major.isdigit() else -1))
    if cls is None or cls.spec.transport != "reply":
        raise ContractError(f"unexpected answer to {question.type}: schema {headers.get(env.SCHEMA)!r}")
    answer = cls.parse(reply.data)
    verifier.verify(headers.get(env.IDENTITY), reply.data, answer)
    return answer


async def budget_status(nc: Any, signer: Signer, verifier: Verifier, timeout: float = 2.0) -> BudgetStatusReport | None:
    """What a budget replica sees now (tasks running and queued per tenant, breaker trips), or
    None when no budget replica answers (none running, or not yet ready)."""
    try:
        answer = await ask(nc, signer, verifier, BudgetStatusRequested(tenant=MESH_WIDE, task_id="status"),
                           timeout=timeout)  # fmt: skip
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    except (ContractError, IdentityError) as exc:
        raise AskError(f"the budget's answer to budget.status was refused: {exc}") from exc
    return answer if isinstance(answer, BudgetStatusReport) else None
