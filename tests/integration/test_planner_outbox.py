"""The planner's outbox is sent in outbox order and only cleared once every message of it is
stored: a publish that fails leaves the whole outbox for the redelivery, which sends it again
without storing anything twice. What is published is cleared by the task's next transition, in
the write it makes anyway, or by a write of its own ``CLEAR_AFTER_S`` later."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from integration_helpers import connect, running, settings_for

from mesh_contracts.v1 import PlanStep, StepRequested
from mesh_contracts.v1.records import StepState, TaskRecord
from mesh_host import Mesh
from mesh_kit import state as st
from mesh_planner.outbox import event as _event
from mesh_planner.service import Planner
from mesh_planner.steps import dispatch_ready

pytestmark = pytest.mark.integration


class NoModel:
    async def complete(self, *_a, **_k):  # pragma: no cover - nothing is planned here
        raise AssertionError("not called")


def _record(task: str) -> TaskRecord:
    steps = [PlanStep(step_id=f"s{i}", instruction=f"do {i}") for i in range(1, 5)]
    rec = TaskRecord(
        tenant="acme", task_id=task, goal="g", status="running", steps={s.step_id: StepState(step=s) for s in steps}
    )
    _event(rec, "task.planned", "4 steps")
    dispatch_ready(rec)  # s1..s4: four step requests, each with its progress event
    return rec


@contextlib.asynccontextmanager
async def _planner_with(infra, task: str) -> AsyncIterator[tuple[Mesh, Planner, TaskRecord, str]]:
    """A running planner, and a stored record of ``task`` whose outbox is four step requests."""
    mesh = Mesh(settings_for(infra, "planner"))
    planner = Planner(mesh, NoModel())  # type: ignore[arg-type]
    mesh.on_start(planner.start)
    async with running(mesh):
        rec = _record(task)
        key = TaskRecord.key("acme", task)
        await planner.kv.put(key, rec.model_dump_json().encode())
        yield mesh, planner, rec, key


async def _stored_steps(infra, task: str) -> list[tuple[str, int]]:
    """(step id, attempt) of every step request stored for the task, in stream order."""
    async with connect(infra, "admin") as nc:
        js = nc.jetstream()
        info = await js.stream_info("STEP", subjects_filter=f"step.v1.acme.{task}.requested")
        n = (info.state.subjects or {}).get(f"step.v1.acme.{task}.requested", 0)
        if not n:
            return []
        sub = await js.subscribe(f"step.v1.acme.{task}.requested", ordered_consumer=True)
        out = []
        for _ in range(n):
            m = StepRequested.parse((await sub.next_msg(timeout=5)).data)
            out.append((m.step.step_id, m.attempt))
        await sub.unsubscribe()
        return out


async def test_an_outbox_is_sent_in_order_and_cleared_only_when_all_of_it_is_stored(
    integration_infra, unique, monkeypatch
):
    infra = integration_infra
    task = unique("outbox")
    async with _planner_with(infra, task) as (mesh, planner, rec, key):
        assert [i.type for i in rec.outbox].count("step.requested") == 4

        # The third step request fails to publish (the broker refused it, say).
        real = mesh.publish

        async def failing(msg, **kw):
            if isinstance(msg, StepRequested) and msg.step.step_id == "s3":
                raise ConnectionError("broker went away")
            return await real(msg, **kw)

        monkeypatch.setattr(mesh, "publish", failing)
        with pytest.raises(ConnectionError, match="broker went away"):
            await planner.outbox.flush(rec)
        stored, _ = await st.load(planner.kv, key, TaskRecord)
        assert stored is not None and stored.outbox == rec.outbox, "nothing cleared: the redelivery sends it all"
        assert await _stored_steps(infra, task) == [("s1", 1), ("s2", 1)], "sent in order, up to the failure"

        # The redelivery: everything again, stored once each, in outbox order, and then cleared.
        monkeypatch.setattr(mesh, "publish", real)
        await planner.outbox.flush(stored)
        assert await _stored_steps(infra, task) == [("s1", 1), ("s2", 1), ("s3", 1), ("s4", 1)]
        await planner.outbox.drain()  # the clear waiting for a next transition, now
        after, _ = await st.load(planner.kv, key, TaskRecord)
        assert after is not None and after.outbox == []

        # A fresh outbox goes out in the order it was written.
        task2 = unique("outbox-order")
        rec2 = _record(task2)
        await planner.kv.put(TaskRecord.key("acme", task2), rec2.model_dump_json().encode())
        await planner.outbox.flush(rec2)
        assert await _stored_steps(infra, task2) == [("s1", 1), ("s2", 1), ("s3", 1), ("s4", 1)]


async def test_a_message_in_two_handlers_outboxes_is_published_once(integration_infra, unique, monkeypatch):
    """Two transitions of one task in a row: the second is written before the first's outbox is
    cleared, so both handlers find the first's messages. Each is published once (a client
    following the task used to see those events twice), and the record ends with no outbox."""
    import asyncio
    from collections import Counter

    async with _planner_with(integration_infra, unique("outbox-twice")) as (mesh, planner, rec, key):
        real, sent = mesh.publish, Counter()

        async def slow(msg, **kw):
            sent[(msg.type, kw["key"])] += 1
            await asyncio.sleep(0.01)  # both handlers are mid-flush at once
            return await real(msg, **kw)

        monkeypatch.setattr(mesh, "publish", slow)
        await asyncio.gather(planner.outbox.flush(rec), planner.outbox.flush(rec))
        assert sent and set(sent.values()) == {1}, sent
        assert len(sent) == len(rec.outbox)
        await planner.outbox.drain()
        after, _ = await st.load(planner.kv, key, TaskRecord)
        assert after is not None and after.outbox == []
        # Published already: a later flush of the same items (a redelivery) sends nothing.
        await planner.outbox.flush(rec)
        assert set(sent.values()) == {1}


async def _writes(infra, key: str) -> int:
    """Writes of one task record the bucket holds (its history keeps 5)."""
    async with connect(infra, "admin") as nc:
        subject = f"$KV.tasks.{key}"
        info = await nc.jetstream().stream_info("KV_tasks", subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)


async def test_a_published_outbox_is_cleared_by_the_next_transition_in_the_write_it_makes_anyway(
    integration_infra, unique
):
    import asyncio

    from mesh_planner.outbox import CLEAR_AFTER_S

    task = unique("outbox-fold")
    async with _planner_with(integration_infra, task) as (_mesh, planner, rec, key):
        await planner.outbox.flush(rec)  # published; its clear waits for a transition
        assert await _writes(integration_infra, key) == 1
        assert (await st.load(planner.kv, key, TaskRecord))[0].outbox == rec.outbox

        def decide(r: TaskRecord) -> bool:
            r.reason = "decided"
            return True

        await planner.transition("acme", task, decide)
        stored, _ = await st.load(planner.kv, key, TaskRecord)
        assert stored is not None and stored.reason == "decided" and stored.outbox == []
        assert await _writes(integration_infra, key) == 2, "the decision and the clear: one write"
        await asyncio.sleep(CLEAR_AFTER_S + 1.0)
        assert await _writes(integration_infra, key) == 2, "the waiting clear found nothing to clear"

    # No transition after it: the outbox is cleared by a write of its own, once its wait is over.
    lone = unique("outbox-lone")
    async with _planner_with(integration_infra, lone) as (_mesh, planner, rec, key):
        await planner.outbox.flush(rec)
        await asyncio.sleep(CLEAR_AFTER_S + 1.0)
        stored, _ = await st.load(planner.kv, key, TaskRecord)
        assert stored is not None and stored.outbox == [] and await _writes(integration_infra, key) == 2
