"""Planning slots (mesh_planner.planning): a free slot goes to the waiting tenant with the fewest
plans in progress, by priority then arrival within it; a slot handed to a wait that was given up
goes on to the next; a hand-over nobody takes lapses."""

from __future__ import annotations

import asyncio

import pytest

from mesh_planner import planning
from mesh_planner.planning import PlanningSlots

pytestmark = pytest.mark.unit


async def _waiting(slots: PlanningSlots, tenant: str, task: str, priority: int = 5) -> asyncio.Task[None]:
    t = asyncio.create_task(slots.wait(tenant, task, priority))
    await asyncio.sleep(0)
    return t


async def test_slots_are_taken_until_none_is_free():
    s = PlanningSlots(2)
    assert s.take("burst", "b1") and s.take("burst", "b2")
    assert not s.take("steady", "s1")
    assert s.take("burst", "b1"), "asked again while planning: still its own"


async def test_a_free_slot_goes_to_the_tenant_planning_least_before_the_burst_it_arrived_after():
    s = PlanningSlots(2)
    s.take("burst", "b1")
    s.take("burst", "b2")
    b3 = await _waiting(s, "burst", "b3")
    b4 = await _waiting(s, "burst", "b4")
    s1 = await _waiting(s, "steady", "s1")
    s.release("burst", "b1")
    await asyncio.sleep(0)
    assert s1.done() and not b3.done(), "steady plans nothing here: its turn comes first"
    assert s.take("steady", "s1") and not s.take("burst", "b5"), "the hand-over is steady's own"
    s.release("burst", "b2")
    await asyncio.sleep(0)
    assert b3.done() and not b4.done(), "then the burst, in arrival order"


async def test_higher_priority_first_within_a_tenant():
    s = PlanningSlots(1)
    s.take("acme", "t0")
    low = await _waiting(s, "acme", "low", priority=1)
    high = await _waiting(s, "acme", "high", priority=9)
    s.release("acme", "t0")
    await asyncio.sleep(0)
    assert high.done() and not low.done()


async def test_a_slot_handed_to_a_wait_given_up_goes_to_the_next():
    s = PlanningSlots(1)
    s.take("acme", "t0")
    gone = await _waiting(s, "acme", "gone")
    nxt = await _waiting(s, "acme", "next")
    gone.cancel()  # e.g. the planner stopping, which hands the submission back
    await asyncio.sleep(0)
    s.release("acme", "t0")
    await asyncio.sleep(0)
    assert nxt.done() and s.take("acme", "next")


async def test_a_hand_over_nobody_takes_lapses(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(planning.time, "monotonic", lambda: clock[0])
    s = PlanningSlots(1)
    s.take("acme", "t0")
    w = await _waiting(s, "acme", "never-back")
    s.release("acme", "t0")
    await asyncio.sleep(0)
    assert w.done() and not s.take("acme", "other")
    clock[0] += planning.GRANT_S + 1
    assert s.take("acme", "other"), "the unclaimed slot was taken back"
