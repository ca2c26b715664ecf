"""A reservation outlives the budget process that held it: asked again within its deadline, of
whichever budget listens next (``mesh_host.ask``), against a real nats-server."""

from __future__ import annotations

import asyncio
import time

import pytest
from integration_helpers import connect, eventually, running, settings_for

from mesh_contracts import topology as topo
from mesh_contracts.v1 import BudgetGranted, BudgetReserve, TaskLimits
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_host import Mesh

pytestmark = pytest.mark.integration


async def _started(mesh: Mesh, task: str) -> None:
    status = StatusRecord(status="planning", created_at=time.time(), limits=TaskLimits(max_tokens=5000))
    await (await mesh.kv(StatusRecord.bucket)).create(TaskRecord.key("acme", task), status.to_bytes())


def _budget(infra) -> Mesh:
    from mesh_budget.service import Budget

    mesh = Mesh(settings_for(infra, "budget"))
    Budget(mesh).register()
    return mesh


async def test_a_reservation_held_by_a_dead_budget_is_answered_by_the_next_one(integration_infra, unique):
    """The first try reaches a budget that dies holding it (a subscriber in the budget's queue group
    that never answers, then leaves); for a while nobody listens; then a budget starts. The
    request, asked again each time, is granted within its deadline: not failed after the first
    try's wait, nor after the no-responder answers."""
    task = unique("asked-again")
    planner = Mesh(settings_for(integration_infra, "planner"))
    worker = Mesh(settings_for(integration_infra, "worker"))
    held: list[str] = []
    async with running(planner), running(worker), connect(integration_infra, "budget") as dying:
        await _started(planner, task)

        async def swallow(msg) -> None:
            held.append(msg.subject)

        sub = await dying.subscribe("budget.*.*.*.reserve", queue=topo.queue_group("budget"), cb=swallow)
        timeout = 30.0
        ask = asyncio.create_task(
            worker.request(
                BudgetReserve(tenant="acme", task_id=task, agent="worker", call_id="c1", tokens=100), timeout=timeout
            )
        )
        await eventually(lambda: held, what="the first try held by the dying budget")
        await sub.unsubscribe()  # it dies holding the request: it never answers
        # Past the first try's wait (a quarter of the timeout), and a second more: the next try
        # found nobody listening and has been asking again since.
        await asyncio.sleep(timeout / 4 + 1.0)
        assert not ask.done(), "a request must not fail while its deadline lasts"
        async with running(_budget(integration_infra)):
            answer = await asyncio.wait_for(ask, 30.0)
    assert isinstance(answer, BudgetGranted) and answer.reservation_id == "c1"
    assert held == [f"budget.v1.acme.{task}.reserve"], "the dead budget saw the first try only"


async def test_a_request_nobody_answers_fails_at_its_deadline(integration_infra, unique):
    """No budget at all: the request is asked again until its deadline, then fails as before
    (the handler's re-run in place takes it from there), not sooner and not forever."""
    import nats

    worker = Mesh(settings_for(integration_infra, "worker"))
    async with running(worker):
        started = time.monotonic()
        with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
            await worker.request(
                BudgetReserve(tenant="acme", task_id=unique("none"), agent="worker", call_id="c1", tokens=1),
                timeout=1.5,
            )
        assert time.monotonic() - started >= 1.3, "asked again until its deadline, not given up at the first no"
