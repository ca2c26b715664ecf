"""Two copies of one submission waiting for a planning slot (JetStream redelivered it while it
waited parked: a cluster node died with the keepalives it was sent). The first copy plans the
task; the second's turn comes after, finds the task planned, and must pass its slot on at once.
It used to keep it until the hand-over lapsed (30 s): with the planner's few slots, every other
submission waited that long (the cluster chaos drill lost a task to its 45 s timeout)."""

from __future__ import annotations

import asyncio

import pytest

from mesh_contracts.v1 import TaskSubmitted
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_durable.ledger import Ledger
from mesh_kit import Park
from mesh_kit import state as st
from mesh_llm import ModelRequest, ScriptedModel
from mesh_planner.planning import PlanningSlots
from mesh_planner.service import Planner
from mesh_testing.fakes import FakeDelivery, FakeMesh
from mesh_testing.memkv import MemoryKV

pytestmark = pytest.mark.unit
PLAN = {"content": '{"steps": [{"step_id": "s1", "instruction": "Find it"}]}'}


class Gated(ScriptedModel):
    """The scripted model; a call for the task named in ``hold`` waits for ``go``."""

    def __init__(self) -> None:
        super().__init__("scripted-1", {"planner": [PLAN]})
        self.go = asyncio.Event()
        self.hold = ""
        self.planned: list[str] = []

    async def complete(self, request: ModelRequest):  # type: ignore[override]
        goal = request.messages[-1].content
        if goal == self.hold:
            await self.go.wait()
        self.planned.append(goal)
        return await super().complete(request)


def _submission(task: str) -> TaskSubmitted:
    return TaskSubmitted(tenant="acme", task_id=task, goal=task)


async def _parks(planner: Planner, task: str) -> asyncio.Task[None]:
    """Hand the planner a copy of ``task``'s submission; it must park: its wait, running."""
    with pytest.raises(Park) as parked:
        await planner.on_submitted(_submission(task), FakeDelivery())
    waiter = asyncio.create_task(parked.value.until())
    await asyncio.sleep(0)
    return waiter


async def test_a_second_copy_of_a_planned_submission_passes_its_slot_on():
    model = Gated()
    planner = Planner(FakeMesh(service="planner"), model)  # type: ignore[arg-type]
    planner.kv, planner.ledger = MemoryKV(), Ledger(MemoryKV(), "planner")
    planner.planning = slots = PlanningSlots(1)

    model.hold = "a"
    a = asyncio.create_task(planner.on_submitted(_submission("a"), FakeDelivery()))
    await asyncio.sleep(0.05)
    assert slots.busy, "a plans in the only slot"
    first, second = await _parks(planner, "b"), await _parks(planner, "b")  # b, and its redelivered copy

    model.go.set()
    await a
    await asyncio.wait_for(first, 10)
    await planner.on_submitted(_submission("b"), FakeDelivery())  # the first copy's turn: it plans b
    assert model.planned == ["a", "b"]
    await asyncio.wait_for(second, 10)  # then the second copy's turn comes
    await planner.on_submitted(_submission("b"), FakeDelivery())
    assert model.planned == ["a", "b"], "b is planned once"

    # c is planned at once: the slot handed to b's second copy was passed on, not kept 30 s.
    await asyncio.wait_for(
        planner.on_submitted(_submission("c"), FakeDelivery()), 10
    )  # not the 30 s a kept slot would take
    assert model.planned == ["a", "b", "c"]
    assert not slots.busy and not slots.granted


async def test_a_copy_whose_turn_came_while_it_was_planned_elsewhere_keeps_nothing():
    slots = PlanningSlots(1)
    assert slots.take("acme", "a")
    waiter = asyncio.create_task(slots.wait("acme", "b"))
    await asyncio.sleep(0)
    slots.release("acme", "a")
    await asyncio.wait_for(waiter, 10)
    assert slots.granted
    slots.unclaimed("acme", "b")
    assert not slots.granted and slots.take("acme", "c")
    slots.unclaimed("acme", "c")
    assert slots.busy, "a task planning now keeps its slot"


async def test_a_task_s_status_record_is_written_as_it_starts_and_again_only_on_a_redelivery():
    """The budget knows a task by its status record (start, limits): the planner writes it when it
    creates the task, not again when the submission comes back from a planning-slot wait or for a
    duplicate that finds it, and again on a redelivery or by a duplicate that does not find it (the
    planner that created the task may have died, or failed to write it, before)."""
    writes: list[str] = []

    class Counting(MemoryKV):
        async def put(self, key: str, value: bytes) -> int:
            writes.append(key)
            return await super().put(key, value)

    model = Gated()
    planner = Planner(FakeMesh(service="planner"), model)  # type: ignore[arg-type]
    planner.kv, planner.ledger, planner.status = MemoryKV(), Ledger(MemoryKV(), "planner"), Counting()
    planner.planning = PlanningSlots(1)
    model.hold = "a"
    a = asyncio.create_task(planner.on_submitted(_submission("a"), FakeDelivery()))
    await asyncio.sleep(0.05)
    waiter = await _parks(planner, "b")  # created (its record written), then waits for the slot
    assert writes == ["acme.a", "acme.b"]
    status, _ = await st.load(planner.status, "acme.b", StatusRecord)
    assert status is not None and status.limits is not None and status.created_at > 0

    model.go.set()
    await a
    await asyncio.wait_for(waiter, 10)
    await planner.on_submitted(_submission("b"), FakeDelivery())  # back from its wait: planned
    assert model.planned == ["a", "b"] and writes == ["acme.a", "acme.b"], "not written again"

    # Tasks a planner created and died (or failed to write, the broker going down) before writing
    # their status records: a copy delivered again writes it, and so does a copy delivered for the
    # first time (a duplicate submission) that finds none. One that finds it writes nothing.
    for task, deliveries in (("c", 2), ("d", 1)):
        record = TaskRecord(tenant="acme", task_id=task, goal=task, created_at=1.0)
        await planner.kv.put(TaskRecord.key("acme", task), record.to_bytes())
        await planner.on_submitted(_submission(task), FakeDelivery(deliveries=deliveries))
        assert model.planned[-1] == task and writes[-1] == f"acme.{task}", (task, writes)
    assert writes == ["acme.a", "acme.b", "acme.c", "acme.d"]
    record = TaskRecord(tenant="acme", task_id="e", goal="e", created_at=1.0)
    await planner.kv.put(TaskRecord.key("acme", "e"), record.to_bytes())
    await planner.status.put(TaskRecord.key("acme", "e"), StatusRecord(status="planning").to_bytes())
    writes.clear()
    await planner.on_submitted(_submission("e"), FakeDelivery())  # a duplicate whose creator wrote it
    assert model.planned[-1] == "e" and writes == [], "not written again"
