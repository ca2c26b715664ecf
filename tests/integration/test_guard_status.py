"""A service that missed a halt or an end as a message still stops: its guard reads the task's
status from the ``status`` bucket, which the planner writes on every halt, end and resume, and
which carries nothing of the task's content (the checker, worker and rag hold no right to read
task records)."""

from __future__ import annotations

import pytest
from integration_helpers import eventually, running, settings_for

from mesh_contracts.v1 import ControlHalt, ControlResume
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_durable.guard import enable as enable_guard
from mesh_host import Mesh
from mesh_kit import state as st
from mesh_planner.service import Planner

pytestmark = pytest.mark.integration


class NoModel:
    async def complete(self, *_a, **_k):  # pragma: no cover - the task is never planned here
        raise AssertionError("not called")


async def test_the_guard_stops_on_a_stored_halt_or_end_and_goes_on_after_a_resume(integration_infra, unique):
    infra = integration_infra
    task = unique("guarded")
    planner_mesh = Mesh(settings_for(infra, "planner"))
    planner = Planner(planner_mesh, NoModel())  # type: ignore[arg-type]
    planner_mesh.on_start(planner.start)
    checker = Mesh(settings_for(infra, "checker"))
    guard = enable_guard(checker)
    async with running(planner_mesh), running(checker):
        # a task record as the planner keeps it (running), written with the planner's identity
        rec = TaskRecord(tenant="acme", task_id=task, goal="g", status="running", created_at=1.0)
        await planner.kv.put(TaskRecord.key("acme", task), rec.model_dump_json().encode())
        assert await guard.check("acme", task) is None, "running: go on"

        # the planner applies a halt (the checker is not subscribed to see it: it 'missed' it)
        await planner.on_control(ControlHalt(tenant="acme", task_id=task, reason="operator says wait"), _D())
        # the guard keeps the status from the bucket's feed: the write arrives within moments
        stop = await eventually(lambda: guard.check("acme", task), timeout=30, what="the stored halt")
        assert stop is not None and stop.halted and "operator says wait" in stop.reason

        await planner.on_control(ControlResume(tenant="acme", task_id=task), _D())
        guard.seen.clear()  # what the checker heard on the core subscription is not the point here
        await eventually(lambda: _goes_on(guard, task), timeout=30, what="resumed: go on")

        def end(r: TaskRecord) -> bool:
            r.status, r.reason = "cancelled", "the tenant cancelled it"
            return True

        await planner.transition("acme", task, end)
        stop = await eventually(lambda: guard.check("acme", task), timeout=30, what="the stored end")
        assert stop is not None and not stop.halted and "cancelled" in stop.reason

        status, _ = await st.load(planner.status, f"acme.{task}", StatusRecord)
        # nothing of what the task is about: its status, start, limits, labels and a workflow's
        # nodes' budget shares (the budget's)
        assert status is not None and set(status.model_dump()) == {
            "record_version", "status", "reason", "created_at", "limits", "labels", "step_shares"
        }, "nothing but the status and what the budget needs"  # fmt: skip
        assert status.step_shares == {}, "no workflow: no shares"
        assert status.created_at == 1.0 and status.limits == rec.limits


async def _goes_on(guard, task: str) -> bool:
    return await guard.check("acme", task) is None


class _Sender:
    name = "operator"


class _D:
    sender = _Sender()
    msg_id = "test"
    deliveries = 1
    stored_at = None
    headers: dict[str, str] = {}
