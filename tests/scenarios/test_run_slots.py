"""Run slots through the real mesh (``MESH_RUN_SLOTS``): the planner runs at most so many tasks
at once, shared fairly among the tenants that want them. A burst waits for slots, queued (queue
time, not a stall), while a quiet tenant's task starts at once; a task waiting for a slot is
cancelled by its own queue limit without ever running; waiting tasks survive their planner."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from mesh_contracts.v1 import TaskCompleted, TaskFailed, TaskLimits
from mesh_contracts.v1.records import AdmissionRecord, TaskRecord
from mesh_kit import state as st
from mesh_testing.chaos import PLANNER, ChaosMesh, latencies, overtaken, report, started
from mesh_testing.infra import Infra, running_infra

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
SLOTS = 1
"""One task of each tenant that wants one at a time (a share is at least one). How long the quiet
tenant waits for what: ``bench/bench_admission.py --burst 300 --run-slots N``."""
ENV = {
    "MESH_RUN_SLOTS": str(SLOTS),
    "MESH_ACK_WAIT_S": "2",
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["steady", "burst", "acme"], name="slots", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


async def _records(infra: Infra) -> dict[str, AdmissionRecord]:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value(AdmissionRecord.bucket)
        out = {}
        for tenant in ("steady", "burst", "acme"):
            rec, _ = await st.load(kv, tenant, AdmissionRecord)
            if rec is not None:
                out[tenant] = rec
        return out
    finally:
        await nc.close()


async def _budget_tenants(mesh: ChaosMesh) -> dict:
    budget = mesh.procs[mesh.names("budget")[0]][1]
    async with httpx.AsyncClient(timeout=2) as client:
        return (await client.get(f"http://127.0.0.1:{budget.http_port}/status")).json().get("tenants", {})


async def test_a_quiet_tenant_keeps_its_latency_while_a_burst_waits_for_slots(infra, mesh):
    """40 tasks at once from 'burst' (stall timeout 2 s, shorter than their wait) while 'steady'
    runs tasks one after another: the burst never holds more than the slots, its waiting tasks
    are queued (not stalled: all of them complete), and each of steady's tasks is planned at once:
    in the broker's order of events, at most the slot's task and the one that takes it over are
    planned between its submission and its plan (never the burst's backlog)."""
    ids: list[str] = []
    async with infra.client("steady") as s, infra.client("burst") as b:
        await latencies(s, GOAL, 2, warm=True)

        limits = TaskLimits(stall_timeout_s=2.0)
        burst = [asyncio.create_task(b.submit(GOAL, limits=limits, progress=False, timeout=300)) for _ in range(40)]
        held: list[int] = []
        queued: list[int] = []

        async def watch() -> None:
            while not all(t.done() for t in burst):
                recs = await _records(infra)
                held.append(sum(len(r.running) for r in recs.values()))
                queued.append(int((await _budget_tenants(mesh)).get("burst", {}).get("queued", 0)))
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)  # the burst is admitted and waiting first
        under = await latencies(s, GOAL, 15, while_=lambda: not all(t.done() for t in burst), timeout=120, ids=ids)
        outcomes = [(await t).outcome for t in burst]
        await watcher

    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["TaskCompleted"] * 40, f"waiting for a slot is queue time, not a stall: {kinds}"
    assert max(held) <= SLOTS + 1, f"the slots, passed by at most one task of a tenant under its share: {held}"
    assert max(queued) > 5, f"the burst's tasks waited for slots, counted queued by the budget: {queued}"
    planned_before = await overtaken(infra, PLANNER, "steady", ids, "burst")
    report("run slots, turns", slots=SLOTS, planned_before=planned_before, latencies_s=[round(x, 3) for x in under])
    assert len(under) >= 5, (under, planned_before)
    assert max(planned_before) <= SLOTS + 1, planned_before
    recs = await _records(infra)
    assert recs["burst"].in_flight == {} and recs["burst"].running == {}, "every slot was given back"
    assert recs["burst"].admitted == 40


async def test_a_task_waiting_for_a_slot_is_cancelled_by_its_max_queue_s_and_never_runs(infra, mesh):
    """With the worker stopped, tasks hold every slot (planned, their steps queued); another
    waits for a slot and its 4 s queue limit cancels it: it never ran (no plan, no slot), its
    submission is not left waiting, and once the worker is back the two complete."""
    (worker,) = mesh.names("worker")
    mesh.kill(worker)
    async with infra.client("acme") as c:
        try:
            holders = [
                asyncio.create_task(c.submit(GOAL, task_id=f"holder-{i}", progress=False, timeout=120))
                for i in range(SLOTS)
            ]
            deadline = time.monotonic() + 20
            while len((await _records(infra)).get("acme", AdmissionRecord()).running) < SLOTS:
                assert time.monotonic() < deadline, "the tasks never took the slots"
                await asyncio.sleep(0.1)
            waiting = await c.submit(
                "Compute 17 * 23.", task_id="waits-1", limits=TaskLimits(max_queue_s=4.0), progress=False, timeout=60
            )
            assert isinstance(waiting.outcome, TaskFailed), waiting.outcome
            assert "queued too long" in waiting.outcome.reason, waiting.outcome
            assert "before it started" in waiting.outcome.reason, waiting.outcome.reason
            rec = await _records(infra)
            assert "waits-1" not in rec["acme"].running and "waits-1" not in rec["acme"].in_flight
            nc = await infra.admin()
            try:
                kv = await nc.jetstream().key_value("tasks")
                task, _ = await st.load(kv, TaskRecord.key("acme", "waits-1"), TaskRecord)
            finally:
                await nc.close()
            assert task is not None and task.status == "cancelled" and task.steps == {}, "it never ran"
        finally:
            await mesh.replace(worker)
        for h in holders:  # with the worker back, the tasks holding the slots complete
            assert isinstance((await h).outcome, TaskCompleted)
    # its submission came back once a slot was free, found the task ended, and was let go
    nc = await infra.admin()
    try:
        deadline = time.monotonic() + 15
        while True:
            info = await nc.jetstream().consumer_info("TASK", "planner--task-submitted")
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            assert time.monotonic() < deadline, f"a submission was left waiting: {info}"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_tasks_waiting_for_slots_survive_a_restart_of_their_planner(infra, mesh):
    """Worker stopped, the slots held and the rest of six tasks waiting at the planner; the
    planner is killed (-9) and replaced; with the worker back, all six complete: nothing waiting
    was lost."""
    (worker,) = mesh.names("worker")
    (planner,) = mesh.names("planner")
    mesh.kill(worker)
    try:
        async with infra.client("acme") as c:
            tasks = [
                asyncio.create_task(c.submit(GOAL, task_id=f"restart-{i}", progress=False, timeout=180))
                for i in range(6)
            ]
            deadline = time.monotonic() + 20
            while True:
                rec = (await _records(infra)).get("acme", AdmissionRecord())
                if len(rec.running) == SLOTS and len(rec.in_flight) == 6:
                    break
                assert time.monotonic() < deadline, f"not admitted as expected: {rec}"
                await asyncio.sleep(0.1)
            mesh.kill(planner)
            await mesh.replace(planner)
            await mesh.replace(worker)
            outcomes = [(await t).outcome for t in tasks]
    finally:
        if not mesh.procs[worker][1].alive():
            await mesh.replace(worker)
    assert [type(o).__name__ for o in outcomes] == ["TaskCompleted"] * 6, outcomes
    assert json.dumps((await _records(infra))["acme"].running) == "{}"
