"""Operators ask the services what they see: a core request signed as the admin, whose answer
is verified against the trust bundle like any other message (``budget.status`` today).

It goes over NATS, not to a service's HTTP ``/status``, so it works against any deployment
(``meshctl top`` and ``meshctl status`` on a cluster, not only on ``meshctl up``'s processes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import nats

from mesh_contracts import Contract, ContractError
from mesh_contracts.registry import BY_TYPE
from mesh_contracts.v1 import BudgetStatusReport, BudgetStatusRequested
from mesh_contracts.v1.audit import MESH_WIDE
from mesh_identity import IdentityError, Signer, Verifier
from mesh_kit import envelope as env
from meshctl.errors import MeshctlError


class AskError(MeshctlError):
    """An answer came that is not what it claims (its reason says why): not believed."""


def _question(signer: Signer, question: Contract) -> tuple[bytes, dict[str, str]]:
    body = question.to_bytes()
    msg_id = env.message_id(question.type, question.tenant, question.task_id, uuid.uuid4().hex[:16])
    return body, env.headers_for(signer, question, body, msg_id)


def _answer(question: Contract, reply: Any, verifier: Verifier) -> Contract:
    headers = dict(reply.headers or {})
    type_name, _, major = headers.get(env.SCHEMA, "").partition("/v")
    cls = BY_TYPE.get((type_name, int(major) if major.isdigit() else -1))
    if cls is None or cls.spec.transport != "reply":
        raise ContractError(f"unexpected answer to {question.type}: schema {headers.get(env.SCHEMA)!r}")
    answer = cls.parse(reply.data)
    verifier.verify(headers.get(env.IDENTITY), reply.data, answer)
    return answer


async def ask(nc: Any, signer: Signer, verifier: Verifier, question: Contract, *, timeout: float = 2.0) -> Contract:
    """Send ``question`` (a ``request`` contract) and return the verified answer. Raises
    ``nats.errors.TimeoutError`` / ``NoRespondersError`` when nobody answers, ``ContractError`` or
    ``IdentityError`` for an answer that is not what it claims."""
    body, headers = _question(signer, question)
    reply = await nc.request(question.subject(), body, timeout=timeout, headers=headers)
    return _answer(question, reply, verifier)


async def ask_all(
    nc: Any, signer: Signer, verifier: Verifier, question: Contract, enough: Callable[[list[Contract]], bool],
    *, timeout: float = 2.0,
) -> list[Contract]:  # fmt: skip
    """Send ``question`` to every replica that answers it and gather their verified answers, until
    ``enough`` says so (or ``timeout``). Raises as ``ask`` when nobody answers."""
    body, headers = _question(signer, question)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    answers: list[Contract] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        await nc.publish(question.subject(), body, reply=inbox, headers=headers)
        while (left := deadline - loop.time()) > 0:
            try:
                reply = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            if (reply.headers or {}).get("Status") == "503":
                raise nats.errors.NoRespondersError
            answers.append(_answer(question, reply, verifier))
            if enough(answers):
                break
    finally:
        await sub.unsubscribe()
    if not answers:
        raise nats.errors.TimeoutError
    return answers


def merge_reports(reports: list[BudgetStatusReport]) -> BudgetStatusReport:
    """One report from every replica's: a tenant's tasks as the replica that sees most of them
    (a tenant is followed by one partition, by each of its replicas alike); trips per kind as the
    replica of each partition that acted on most, added up over the partitions."""
    tenants: dict[str, Any] = {}
    for r in reports:
        for name, seen in r.tenants.items():
            known = tenants.get(name)
            if known is None or (seen.running + seen.queued, seen.queued_s) > (
                known.running + known.queued,
                known.queued_s,
            ):
                tenants[name] = seen
    trips: dict[int, dict[str, int]] = {}
    after: dict[str, float] = {}
    for r in reports:
        mine = trips.setdefault(r.partition, {})
        for kind, n in r.trips.items():
            mine[kind] = max(mine.get(kind, 0), n)
        for kind, s in r.detected_after_s.items():
            after[kind] = max(after.get(kind, 0.0), s)
    total: dict[str, int] = {}
    for mine in trips.values():
        for kind, n in mine.items():
            total[kind] = total.get(kind, 0) + n
    first = reports[0]
    return first.model_copy(update={
        "replica": ", ".join(sorted({r.replica for r in reports})),
        "started_at": min(r.started_at for r in reports),
        "tenants": dict(sorted(tenants.items())), "trips": total, "detected_after_s": after,
        "partitions": max(r.partitions for r in reports), "partition": 0,
    })  # fmt: skip


async def budget_status(nc: Any, signer: Signer, verifier: Verifier, timeout: float = 2.0) -> BudgetStatusReport | None:
    """What the budget sees now (tasks running and queued per tenant, breaker trips), or None
    when no budget replica answers (none running, or not yet ready). Every replica answers; with
    the tenants split into partitions (``MESH_BUDGET_PARTITIONS``) their reports are added up
    once every partition has answered. ``AskError`` when one has not within ``timeout``: its
    tenants' numbers would be missing, not zero."""

    def covered(answers: Sequence[Contract]) -> bool:
        reports = [a for a in answers if isinstance(a, BudgetStatusReport)]
        return bool(reports) and {r.partition for r in reports} >= set(range(max(r.partitions for r in reports)))

    question = BudgetStatusRequested(tenant=MESH_WIDE, task_id="status")
    try:
        answers = await ask_all(nc, signer, verifier, question, covered, timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    except (ContractError, IdentityError) as exc:
        raise AskError(f"the budget's answer to budget.status was refused: {exc}") from exc
    reports = [a for a in answers if isinstance(a, BudgetStatusReport)]
    if not reports:
        return None
    if not covered(reports):
        n = max(r.partitions for r in reports)
        missing = sorted(set(range(n)) - {r.partition for r in reports})
        raise AskError(
            f"budget partition(s) {', '.join(str(i) for i in missing)} of {n} did not answer budget.status in "
            f"{timeout:g} s: their tenants' running, queued and trips are unknown"
        )
    return merge_reports(reports)
