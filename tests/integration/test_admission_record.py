"""The planner's admission record on a real bucket: two planner replicas admitting at once never
admit more than the limit, a redelivered submission is not counted twice, a release frees a
slot, and a task whose end was never recorded stops counting after its deadline. Run slots: waiting tasks
are woken one per free slot, in order, and a woken task that ends before it takes its slot
passes it on at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from integration_helpers import running, settings_for

from mesh_contracts.v1.records import AdmissionRecord
from mesh_host import Mesh
from mesh_kit import state as st
from mesh_planner.admission import Admission, Limits, Wait

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def following(integration_infra, limits: Limits, *, slots: int) -> AsyncIterator[Admission]:
    """A planner's admission with run slots, following every tenant's record (as ``Planner.start``)."""
    mesh = Mesh(settings_for(integration_infra, "planner"))
    async with running(mesh):
        adm = Admission(st.bind(mesh.nc, "admission"), limits, slots=slots)
        await adm.follow(mesh.nc)
        try:
            yield adm
        finally:
            await adm.close()


async def test_two_replicas_admit_exactly_the_limit_and_releases_free_slots(integration_infra, unique):
    mesh = Mesh(settings_for(integration_infra, "planner"))
    tenant = unique("tenant").replace("-", "")
    async with running(mesh):
        a = Admission(st.bind(mesh.nc, "admission"), Limits(max_in_flight=10))
        b = Admission(st.bind(mesh.nc, "admission"), Limits(max_in_flight=10))  # another replica's view
        verdicts = await asyncio.gather(
            *((a if i % 2 else b).admit(tenant, f"t{i}", deadline_s=300) for i in range(40))
        )
        admitted = [f"t{i}" for i, v in enumerate(verdicts) if v is None]
        assert len(admitted) == 10, "exactly the limit, whatever the interleaving of compare-and-sets"
        assert {v.code for v in verdicts if v is not None} == {"too_many_in_flight"}

        assert await a.admit(tenant, admitted[0], deadline_s=300) is None, "a redelivery is admitted again ..."
        rec, _ = await st.load(a.kv, tenant, AdmissionRecord)
        assert rec is not None and rec.admitted == 10 and len(rec.in_flight) == 10, "... and not counted twice"
        assert rec.refused == {}, "a refusal writes nothing: its count goes with the next write"

        await b.release(tenant, admitted[0], took_s=2.0)
        await b.release(tenant, admitted[0], took_s=2.0)  # twice: the second is a no-op
        await b.release(tenant, admitted[1], took_s=None)  # a poison submission given up on: no duration
        assert await a.admit(tenant, "early", deadline_s=300) is None
        rec, _ = await st.load(a.kv, tenant, AdmissionRecord)
        assert rec is not None and rec.refused == {"too_many_in_flight": 30}, "both replicas' refusals, counted once"
        assert await a.admit(tenant, "late", deadline_s=300) is None, "the released slot is free"
        # A replica that has refused nobody yet: its first refused client comes back within one
        # slot of the drain (a slot frees every mean duration / tasks in flight: 2.0 s / 10), and
        # each next one a slot further on (mesh_tenancy.retry_after), not all together.
        c = Admission(st.bind(mesh.nc, "admission"), Limits(max_in_flight=10))
        now = time.time()
        refused = [await c.admit(tenant, f"later-{k}", deadline_s=300, now=now) for k in range(5)]
        waits = [r.retry_after_s for r in refused if r is not None and r.code == "too_many_in_flight"]
        assert len(waits) == 5 and len(set(waits)) == 5, waits
        for k, wait in enumerate(waits):
            assert max(0.1, 0.2 * k) <= wait <= 0.2 * (k + 1) + 0.001, (k, waits)


async def test_an_admission_whose_end_was_never_recorded_lapses_after_its_deadline(integration_infra, unique):
    mesh = Mesh(settings_for(integration_infra, "planner"))
    tenant = unique("tenant").replace("-", "")
    async with running(mesh):
        adm = Admission(st.bind(mesh.nc, "admission"), Limits(max_in_flight=1))
        assert await adm.admit(tenant, "crashed", deadline_s=10, now=1000.0) is None
        assert await adm.admit(tenant, "next", deadline_s=10, now=1050.0) is not None, "still counted at 50 s"
        assert await adm.admit(tenant, "next", deadline_s=10, now=1000.0 + 10 + 61) is None, "lapsed: deadline + grace"


async def test_the_rate_is_a_token_bucket(integration_infra, unique):
    mesh = Mesh(settings_for(integration_infra, "planner"))
    tenant = unique("tenant").replace("-", "")
    async with running(mesh):
        adm = Admission(st.bind(mesh.nc, "admission"), Limits(rate_per_s=2.0, burst=3))
        got = [await adm.admit(tenant, f"t{i}", deadline_s=300, now=100.0) for i in range(5)]
        assert [g is None for g in got] == [True, True, True, False, False], "a burst of 3"
        assert got[3] is not None and got[3].code == "rate_limited" and 0.5 <= got[3].retry_after_s <= 1.0, got[3]
        assert got[4] is not None and 1.0 <= got[4].retry_after_s <= 1.5, "the next token, then the one after"
        assert await adm.admit(tenant, "t5", deadline_s=300, now=100.5) is None, "one token back after 0.5 s"
        assert await adm.admit(tenant, "t6", deadline_s=300, now=100.5) is not None


async def test_run_slots_wake_one_waiting_task_per_free_slot_and_a_lost_wakeup_passes_it_on(integration_infra, unique):
    async with following(integration_infra, Limits(), slots=1) as adm:
        tenant = unique("tenant").replace("-", "")
        assert await adm.admit(tenant, "first", deadline_s=300) is None, "a free slot: it starts"
        second = await adm.admit(tenant, "second", deadline_s=300)
        third = await adm.admit(tenant, "third", deadline_s=300)
        assert isinstance(second, Wait) and isinstance(third, Wait), (second, third)
        woke2, woke3 = asyncio.create_task(second.until()), asyncio.create_task(third.until())
        await asyncio.sleep(0.3)
        assert not woke2.done() and not woke3.done(), "the one slot is held"

        await adm.release(tenant, "first", took_s=1.0)
        await asyncio.wait_for(woke2, 30)
        await asyncio.sleep(0.3)
        assert not woke3.done(), "one free slot wakes one task, the first to wait"

        # 'second' was cancelled while it waited: it ends without asking again. The slot it
        # was promised goes on now, not once the promise lapses (WOKEN_S).
        await adm.release(tenant, "second", took_s=None)
        await asyncio.wait_for(woke3, 30)
        assert await adm.admit(tenant, "third", deadline_s=300) is None, "asked again, it takes the slot"
        rec, _ = await st.load(adm.kv, tenant, AdmissionRecord)
        assert rec is not None and set(rec.running) == {"third"} and set(rec.in_flight) == {"third"}, rec


async def test_a_task_that_lost_a_slot_to_another_replica_keeps_its_place_in_the_line(integration_infra, unique):
    """Two planner replicas each wake their first waiting task for the one free slot; the one
    that loses the compare-and-set waits again ahead of the tasks admitted after it, not behind
    them (it went to the back of its replica's line, and with replicas a task could lose again
    and again: issue 45's quiet tail doubled with a second planner)."""
    async with (
        following(integration_infra, Limits(), slots=1) as a,
        following(integration_infra, Limits(), slots=1) as b,
    ):
        tenant = unique("tenant").replace("-", "")
        assert await a.admit(tenant, "running", deadline_s=300) is None
        a1 = await a.admit(tenant, "a1", deadline_s=300)
        b1 = await b.admit(tenant, "b1", deadline_s=300)
        a2 = await a.admit(tenant, "a2", deadline_s=300)
        assert isinstance(a1, Wait) and isinstance(b1, Wait) and isinstance(a2, Wait), (a1, b1, a2)
        woke_a1, woke_b1 = asyncio.create_task(a1.until()), asyncio.create_task(b1.until())
        woke_a2 = asyncio.create_task(a2.until())  # parked at once, as the planner does
        await asyncio.sleep(0.3)

        await a.release(tenant, "running", took_s=1.0)
        await asyncio.wait_for(asyncio.gather(woke_a1, woke_b1), 30)  # each replica woke its first
        assert await b.admit(tenant, "b1", deadline_s=300) is None, "b1 asked first: it takes the slot"
        again = await a.admit(tenant, "a1", deadline_s=300)
        assert isinstance(again, Wait), "a1 lost the slot: it waits again"
        woke_a1 = asyncio.create_task(again.until())
        await asyncio.sleep(0.3)
        assert not woke_a1.done() and not woke_a2.done(), "b1 holds the one slot"

        await b.release(tenant, "b1", took_s=1.0)
        done, _ = await asyncio.wait({woke_a1, woke_a2}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.3)
        assert done == {woke_a1} and not woke_a2.done(), "the next free slot is a1's, admitted before a2"
        assert await a.admit(tenant, "a1", deadline_s=300) is None
        woke_a2.cancel()


async def test_an_idle_task_gives_its_run_slot_to_a_waiting_one_and_takes_one_back_when_woken(
    integration_infra, unique
):
    """A workflow task waiting for an approval (``mark_idle``) frees its slot for the next task;
    its wait over, it runs again at once, over the cap, rather than queue behind tasks not started."""
    async with following(integration_infra, Limits(max_in_flight=2), slots=1) as adm:
        tenant = unique("tenant").replace("-", "")
        assert await adm.admit(tenant, "approval", deadline_s=300) is None
        second = await adm.admit(tenant, "second", deadline_s=300)
        assert isinstance(second, Wait)
        woke = asyncio.create_task(second.until())
        adm.mark_idle(tenant, "approval", True)
        await adm.idle_written()
        await asyncio.wait_for(woke, 30)
        assert await adm.admit(tenant, "second", deadline_s=300) is None, "the slot it gave back"
        third = await adm.admit(tenant, "third", deadline_s=300)
        assert third is not None and not isinstance(third, Wait) and third.code == "too_many_in_flight", (
            "an idle task is still in flight: it counts against max_in_flight"
        )
        assert await adm.admit(tenant, "approval", deadline_s=300) is None, "redelivered: started already"
        adm.mark_idle(tenant, "approval", False)
        await adm.idle_written()
        rec, _ = await st.load(adm.kv, tenant, AdmissionRecord)
        assert rec is not None and set(rec.running) == {"approval", "second"} and not rec.idle, rec
        adm.mark_idle(tenant, "approval", True)
        await adm.idle_written()
        await adm.release(tenant, "approval", took_s=5.0)
        rec, _ = await st.load(adm.kv, tenant, AdmissionRecord)
        assert rec is not None and set(rec.in_flight) == set(rec.running) == {"second"} and not rec.idle, rec
        adm.mark_idle(tenant, "approval", False)  # ended: nothing to do
        await adm.idle_written()
        assert (await st.load(adm.kv, tenant, AdmissionRecord))[0] == rec


async def test_idle_changes_that_come_together_are_written_together(integration_infra, unique):
    """``mark_idle`` does not keep the planner's handler waiting: what its tasks changed meanwhile
    goes to the tenant's record in one compare-and-set (200 timers due at once made 200 writes)."""
    # Plenty of slots: other tests' tenants in the shared bucket would otherwise take shares.
    async with following(integration_infra, Limits(), slots=100) as adm:
        tenant = unique("tenant").replace("-", "")
        for t in ("a", "b", "c"):
            assert await adm.admit(tenant, t, deadline_s=300) is None
        _, before = await st.load(adm.kv, tenant, AdmissionRecord)
        for t in ("a", "b", "c"):
            adm.mark_idle(tenant, t, True)
        assert adm.idle_as_seen(tenant, "b"), "what is pending counts as seen"
        await adm.idle_written(timeout=30)
        rec, after = await st.load(adm.kv, tenant, AdmissionRecord)
        assert rec is not None and set(rec.idle) == {"a", "b", "c"} and not rec.running, rec
        assert after == before + 1, "one write for the three"


async def test_with_run_slots_the_drain_is_the_running_tasks_not_the_queued_ones(integration_infra, unique):
    """A burst admitted behind one run slot drains a task per mean duration: its refused clients
    are spread one mean duration apart, not told to come back all within a fraction of a second
    (the bench measured 48 refused all told 0.1 s, 26 of them back within 100 ms)."""
    async with following(integration_infra, Limits(max_in_flight=4), slots=1) as adm:
        tenant = unique("tenant").replace("-", "")
        assert await adm.admit(tenant, "a", deadline_s=300) is None
        for t in ("b", "c", "d"):
            assert isinstance(await adm.admit(tenant, t, deadline_s=300), Wait), t
        await adm.release(tenant, "a", took_s=2.0)  # a run takes 2 s
        assert await adm.admit(tenant, "e", deadline_s=300) is None, "the freed slot"
        now = time.time()
        refused = [await adm.admit(tenant, f"late-{k}", deadline_s=300, now=now) for k in range(5)]
        waits = [r.retry_after_s for r in refused if r is not None and r.code == "too_many_in_flight"]
        assert len(waits) == 5, refused
        for k, wait in enumerate(waits):  # one running task: a place every 2 s, not every 2 s / 4
            assert max(0.1, 2.0 * k) <= wait <= 2.0 * (k + 1) + 0.001, (k, waits)
