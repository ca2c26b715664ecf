"""Scenarios that provoke each failure the budget service exists to stop, through the real mesh.

The scripted model is cued (``PLAN:`` in a goal, ``#loop`` / ``#await:`` / ``#provider-down``
in a step) to misbehave the way real agents do. Each scenario asserts the failure was detected
with the right reason, that no task spent a token beyond its ceiling, and that another
tenant's task running beside it was unaffected. Numbers go to the chaos report.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import nats.js.errors
import pytest

from mesh_agent import prices
from mesh_contracts.v1 import (
    BudgetDenied,
    BudgetGranted,
    BudgetReserve,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    UsageRecorded,
)
from mesh_contracts.v1.records import TaskRecord
from mesh_durable import records
from mesh_durable.chain import CLOCK_SKEW_S, verify
from mesh_host import Mesh
from mesh_identity import TrustBundle, Verifier
from mesh_kit.settings import BROKER_UNAVAILABLE
from mesh_llm.resilience import BreakerPolicy
from mesh_testing.chaos import ChaosMesh, report
from mesh_testing.infra import Infra, running_infra
from meshctl import audit
from meshctl.cli import main
from meshctl.provision import provision

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
ENV = {
    # Tasks here run side by side on purpose (an operator halts one while another runs; tenants
    # race for a ceiling): fairness between them is test_run_slots' business, not this module's.
    "MESH_RUN_SLOTS": "0",
    "MESH_ACK_WAIT_S": "2",
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_BUDGET_PROVIDER_COOLDOWN_S": "3",
    "MESH_BUDGET_AUDIT_ANCHOR_S": "1",
    "MESH_TOOL_POLICY": '{"send_email": {"rate_per_min": 0}}',
    "MESH_BUDGET_TENANT_LIMITS": '{"initech": {"daily_tokens": 1000}}',
    "MESH_MEMORY_TRIM_S": "0.5",  # freed memory handed back often enough to be seen in /status
}


def plan(*steps: dict) -> str:
    return "PLAN: " + json.dumps({"steps": list(steps)})


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex", "initech"], name="budget", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    m = ChaosMesh(infra, env=ENV, replicas={"budget": 2})
    m.start()
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


def overshoot(usage: dict, limits: TaskLimits) -> tuple[int, float]:
    t = usage["total"]
    return (
        max(0, t["input_tokens"] + t["output_tokens"] - limits.max_tokens),
        max(0.0, t["cost_usd"] - limits.max_cost_usd),
    )


async def run_beside(infra: Infra, tenant: str, goal: str, task_id: str, limits: TaskLimits, timeout: float = 60):
    """Run ``goal`` for ``tenant`` while globex runs the sample task: (outcome, globex outcome)."""
    async with infra.client(tenant) as c, infra.client("globex") as g:
        mine, other = await asyncio.gather(
            c.submit(goal, task_id=task_id, limits=limits, timeout=timeout),
            g.submit(GOAL, task_id=f"{task_id}-beside", timeout=timeout),
        )
    return mine, other


def stage(seen, name: str):
    return next((e for e in seen.events if e.stage == name), None)


async def kept_facts(mesh: ChaosMesh) -> int:
    """Tasks whose facts the budget replicas keep in memory, added up (``/status`` ``kept``)."""
    async with httpx.AsyncClient(timeout=5) as http:
        seen = [
            (await http.get(f"http://127.0.0.1:{proc.http_port}/status")).json()["kept"]["facts"]
            for name, (svc, proc) in mesh.procs.items()
            if svc == "budget"
        ]
    return sum(seen)


async def test_a_replica_forgets_a_task_when_it_ends_and_keeps_one_still_running(infra, mesh):
    """First in this module (nothing else kept yet). What a budget replica keeps of a task goes
    when the watch sees the task end, not 20,000 tasks later; a task still running stays kept
    (its idle bound, ``MESH_BUDGET_TASK_MEMORY_S``, is 300 s here)."""
    await infra.running_task("memory-running", 10_000)
    async with infra.connected_as("worker") as worker:
        assert isinstance(await worker.request(reserve("memory-running", "m1", 100), timeout=5), BudgetGranted)
    assert await kept_facts(mesh) == 1, "the replica that answered keeps the running task's facts"
    async with infra.client("acme") as c:
        seen = await c.submit(GOAL, task_id="memory-done", timeout=60)
    assert isinstance(seen.outcome, TaskCompleted), seen.outcome
    assert len([e for e in seen.events if e.stage == "step.completed"]) >= 2, "its steps reserved model calls"
    deadline = time.monotonic() + 30
    while (n := await kept_facts(mesh)) != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert n == 1, f"{n} tasks kept: the ended task's facts were not forgotten"
    async with infra.connected_as("worker") as worker:  # the running one is still decided the same
        assert isinstance(await worker.request(reserve("memory-running", "m2", 100), timeout=5), BudgetGranted)
        late = await worker.request(reserve("memory-done", "late", 1), timeout=5)
    assert isinstance(late, BudgetDenied) and late.code == "stopped", late  # read again: it ended
    # The running task, on each replica that answered one of its two reservations; the ended
    # task's refusal keeps nothing.
    assert await kept_facts(mesh) in (1, 2)
    async with httpx.AsyncClient(timeout=5) as http:  # and each process hands freed memory back
        trimmed = {
            name: (await http.get(f"http://127.0.0.1:{proc.http_port}/status")).json()["memory"]
            for name, (svc, proc) in mesh.procs.items()
        }
    assert len(trimmed) >= 7, trimmed
    assert not {n: m for n, m in trimmed.items() if not (m["trims"] >= 1 and m["resident_mb"] > 0)}


async def test_two_steps_waiting_on_each_other_are_detected_within_a_second_and_broken(infra, mesh):
    goal = "Deadlock drill. " + plan(
        {"step_id": "s1", "kind": "research", "tools": ["await_step"], "instruction": "#await:s2 Summarise s2"},
        {"step_id": "s2", "kind": "answer", "tools": [], "depends_on": ["s1"], "instruction": "Write the answer"},
    )
    limits = TaskLimits()
    mine, other = await run_beside(infra, "acme", goal, "deadlock-1", limits)
    assert isinstance(mine.outcome, TaskFailed), mine.outcome
    assert "deadlock" in mine.outcome.reason and "step:s1" in mine.outcome.reason and "step:s2" in mine.outcome.reason
    found = stage(mine, "budget.deadlock")
    assert found is not None and set(found.detail["members"]) >= {"step:s1", "step:s2"}
    assert found.detail["detected_after_s"] < 1.0, found.detail
    assert isinstance(other.outcome, TaskCompleted), "the other tenant's task is unaffected"
    assert overshoot(await infra.spent("acme", "deadlock-1"), limits) == (0, 0.0)
    report("budget deadlock", detected_after_s=found.detail["detected_after_s"], reason=mine.outcome.reason[:120])


async def test_a_worker_stuck_in_a_tool_loop_is_stopped_before_its_own_iteration_cap(infra, mesh):
    goal = "Loop drill. " + plan(
        {"step_id": "s1", "kind": "compute", "tools": ["calculator"], "instruction": "#loop keep checking 1 + 1"},
        {"step_id": "s2", "kind": "answer", "tools": [], "depends_on": ["s1"], "instruction": "Write the answer"},
    )
    limits = TaskLimits()
    mine, other = await run_beside(infra, "acme", goal, "loop-1", limits)
    assert isinstance(mine.outcome, TaskFailed) and "loop: step s1 called calculator" in mine.outcome.reason
    assert "dependents not run: s2" in mine.outcome.reason or mine.outcome.failed_step is None
    await asyncio.sleep(1.0)  # anything still in flight would be accounted by now
    usage = await infra.spent("acme", "loop-1")
    assert usage["by_step"]["s1"]["calls"] < 6, "the budget stopped it before the worker's own cap of 6"
    assert isinstance(other.outcome, TaskCompleted)
    assert overshoot(usage, limits) == (0, 0.0)
    report("budget tool loop", model_calls=usage["by_step"]["s1"]["calls"], reason=mine.outcome.reason[:120])


async def test_planner_checker_ping_pong_is_a_loop(infra, mesh):
    goal = "Ping-pong drill. " + plan(
        {"step_id": "s1", "kind": "answer", "tools": [], "instruction": "Answer from memory, citing nothing"}
    )
    limits = TaskLimits(max_revisions=10)
    mine, other = await run_beside(infra, "acme", goal, "pingpong-1", limits)
    assert isinstance(mine.outcome, TaskFailed) and "loop:" in mine.outcome.reason, mine.outcome
    checks = [e for e in mine.events if e.stage == "check.requested"]
    assert 2 <= len(checks) <= 4, "stopped after a few rounds, long before the 10 revisions allowed"
    assert isinstance(other.outcome, TaskCompleted)
    report("budget ping-pong", check_rounds=len(checks), reason=mine.outcome.reason[:120])


async def test_a_failing_provider_without_a_fallback_fails_the_step_after_bounded_retries_not_a_storm(infra, mesh):
    """The gateway retries a failing provider a bounded number of times (3 attempts with
    backoff), every attempt accounted; then the step fails with the provider's error and the
    task with it. No message is redelivered into a retry storm. (Through a fallback the same
    outage completes the task: tests/scenarios/test_gateway_scenarios.py.)"""
    goal = "Outage drill. " + plan(
        {"step_id": "s1", "kind": "answer", "tools": [], "instruction": "#provider-down answer the question"}
    )
    async with infra.client("acme") as c:
        seen = await c.submit(goal, task_id="storm-1", timeout=30)
    assert isinstance(seen.outcome, TaskFailed), seen.outcome
    assert "model (server_error)" in seen.outcome.reason and "503" in seen.outcome.reason, seen.outcome.reason
    await asyncio.sleep(0.5)
    usage = await infra.spent("acme", "storm-1")
    assert usage["errors"] == 3, "each of the gateway's three attempts was accounted, and nothing more"
    stages = {e.stage for e in seen.events}
    assert "budget.retry_storm" not in stages and "task.halted" not in stages, stages
    async with infra.client("globex") as g:
        # The worker's breaker for that provider/model may have opened (it depends on the other
        # calls in its window); after its cool-down the provider is tried again.
        await asyncio.sleep(BreakerPolicy().cooldown_s + 0.5)
        after = await g.submit(GOAL, task_id="storm-1-after", timeout=60)
    assert isinstance(after.outcome, TaskCompleted), "the circuit closed again after its cool-down"
    report("budget failing provider", failed_attempts=usage["errors"], reason=seen.outcome.reason[:120])


@pytest.mark.parametrize("ceiling", ["tokens", "cost"])
async def test_a_task_that_would_cross_its_ceiling_mid_task_stops_with_zero_overshoot(infra, mesh, ceiling):
    async with infra.client("globex") as g:
        free = await g.submit(GOAL, task_id=f"free-{ceiling}", limits=TaskLimits(max_steps=4), timeout=60)
    assert isinstance(free.outcome, TaskCompleted)
    steps = (await settled(infra, "globex", f"free-{ceiling}", lambda u: "s3" in u["by_step"]))["by_step"]
    # The last call (s3, after s1 and s2) reserves its worst case: prompt + 512 output tokens.
    # A ceiling one unit short of (everything before it + that worst case) must stop the task
    # there at the latest; the scripted model is deterministic, so these numbers are exact.
    before_s3 = {
        k: sum(steps[s][k] for s in ("plan", "s1", "s2")) for k in ("input_tokens", "output_tokens", "cost_usd")
    }
    s3_in = steps["s3"]["input_tokens"]
    if ceiling == "tokens":
        limits = TaskLimits(
            max_steps=4, max_tokens=before_s3["input_tokens"] + before_s3["output_tokens"] + s3_in + 511
        )
    else:
        worst = prices.current().price("scripted", "scripted-1").worst_case(s3_in, 512)
        limits = TaskLimits(max_steps=4, max_cost_usd=round(before_s3["cost_usd"] + worst - 1e-6, 6))
    async with infra.client("acme") as c:
        seen = await c.submit(GOAL, task_id=f"ceiling-{ceiling}", limits=limits, timeout=60)
    assert isinstance(seen.outcome, TaskFailed), seen.outcome
    assert f"budget (task_{ceiling})" in seen.outcome.reason, seen.outcome.reason
    usage = await settled(infra, "acme", f"ceiling-{ceiling}", lambda u: u["total"]["calls"] >= 1)
    assert usage["total"]["calls"] >= 1, f"it crossed mid-task, not at the first call: {usage} ({seen.outcome.reason})"
    assert overshoot(usage, limits) == (0, 0.0), usage["total"]
    report(f"budget {ceiling} ceiling", spent=usage["total"], ceiling=limits.model_dump(), overshoot=0)


async def settled(infra: Infra, tenant: str, task: str, ready, timeout: float = 10.0) -> dict:
    """The task's accounted usage once ``ready`` holds and two reads 0.3 s apart agree (usage is
    accounted from the stream, moments after the task ends), or as it is at ``timeout``."""
    deadline = time.monotonic() + timeout
    last = await infra.spent(tenant, task)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = await infra.spent(tenant, task)
        if ready(now) and now == last:
            return now
        last = now
    return last


async def _started(infra: Infra, tenant: str, *tasks: str, timeout: float = 60.0) -> None:
    """Until each task has started (its record made: planned, or being planned)."""
    admin = await infra.admin()
    try:
        kv = await admin.jetstream().key_value(TaskRecord.bucket)
        deadline = time.monotonic() + timeout
        for task in tasks:
            while (rec := await records.task_record(kv, tenant, task)) is None or not rec.goal:
                assert time.monotonic() < deadline, f"{task} never started"
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


def reserve(task: str, call: str, tokens: int, tenant: str = "acme") -> BudgetReserve:
    return BudgetReserve(tenant=tenant, task_id=task, agent="worker", call_id=call, tokens=tokens, cost_usd=0.0)


def used(task: str, call: str, inp: int, out: int, tenant: str = "acme", reservation: str = "") -> UsageRecorded:
    return UsageRecorded(tenant=tenant, task_id=task, agent="worker", call_id=call, provider="scripted",
                         model="scripted-1", input_tokens=inp, output_tokens=out,
                         reservation_id=reservation or call)  # fmt: skip


async def test_50_parallel_reservations_with_a_budget_replica_killed_never_overspend(infra, mesh):
    task, size, fits = "parallel-50", 100, 20
    await infra.running_task(task, size * fits)
    async with infra.connected_as("worker") as worker:
        granted, denied, killed = await _parallel(worker, mesh, task, size, fits)
    assert killed.is_set()
    assert len(granted) == fits and len(denied) == 50 - fits, (len(granted), len(denied))
    for _ in range(50):
        usage = await infra.spent("acme", task)
        if usage["total"]["calls"] == fits:
            break
        await asyncio.sleep(0.1)
    assert usage["total"]["input_tokens"] + usage["total"]["output_tokens"] == size * fits, "spent = ceiling, not more"
    await mesh.replace("budget-0")  # later scenarios keep two replicas
    report("budget 50 parallel reservations", granted=len(granted), denied=len(denied), overshoot_tokens=0)


async def _parallel(worker: Mesh, mesh: ChaosMesh, task: str, size: int, fits: int):
    granted: list[str] = []
    denied: list[str] = []
    killed = asyncio.Event()

    async def call(i: int) -> None:
        await asyncio.sleep(i * 0.02)
        ask = reserve(task, f"c{i}", size)
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = await worker.request(ask, timeout=1.0)
                break
            except BROKER_UNAVAILABLE:  # the replica that had it died: ask again, same call id
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        if isinstance(answer, BudgetDenied):
            denied.append(ask.call_id)
            return
        assert isinstance(answer, BudgetGranted)
        granted.append(ask.call_id)
        if len(granted) == fits // 2 and not killed.is_set():
            killed.set()
            mesh.kill("budget-0")
        await worker.publish(used(task, ask.call_id, 60, 40), key=ask.call_id)

    await asyncio.gather(*(call(i) for i in range(50)))
    return granted, denied, killed


async def wipe_budget_redis(infra: Infra) -> int:
    """Redis loses the budget's data (a restart without persistence, a failover to an empty
    replica): delete every key the budget's own Redis user can see."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(infra.redis_url("budget"))
    try:
        keys = [k async for k in r.scan_iter("budget:*")]
        return await r.delete(*keys) if keys else 0
    finally:
        await r.aclose()


async def test_redis_losing_its_data_forgets_no_reservation_in_flight(infra, mesh):
    """Redis holds only the fast view: the reservations of calls in flight and the spend
    already accounted come back from JetStream, so the ceiling still holds exactly."""
    task, size = "redis-lost", 100
    await infra.running_task(task, 10 * size)
    async with infra.connected_as("worker") as worker:
        first = [await worker.request(reserve(task, f"a{i}", size)) for i in range(6)]
        assert all(isinstance(a, BudgetGranted) for a in first), first
        assert await wipe_budget_redis(infra) > 0
        second = [await worker.request(reserve(task, f"b{i}", size)) for i in range(5)]
        assert [type(a).__name__ for a in second] == ["BudgetGranted"] * 4 + ["BudgetDenied"], second
        assert second[-1].code == "task_tokens" and "0 available" in second[-1].reason, second[-1]
        # The first six calls finish and are accounted; Redis loses everything again: now the
        # spend comes from the budget bucket and the last four from the reservations bucket.
        await asyncio.gather(*(worker.publish(used(task, f"a{i}", 60, 40), key=f"a{i}") for i in range(6)))
        for _ in range(100):
            if (await infra.spent("acme", task))["total"]["calls"] == 6:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the release follows the accounting
        assert await wipe_budget_redis(infra) > 0
        third = await worker.request(reserve(task, "c0", 1))
        assert isinstance(third, BudgetDenied) and third.code == "task_tokens", third
        again = await worker.request(reserve(task, "b0", size))
        assert isinstance(again, BudgetGranted), "a repeated request still holds its reservation"
    usage = await infra.spent("acme", task)
    assert usage["total"]["input_tokens"] + usage["total"]["output_tokens"] == 6 * size
    report("budget redis lost", granted_after_loss=4, denied_after_loss=1, overshoot_tokens=0)


async def _day_spent(infra: Infra, tenant: str) -> int:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value("budget")
        try:
            day = json.loads((await kv.get(f"tenant.{tenant}.{time.strftime('%Y%m%d', time.gmtime())}")).value)
        except nats.js.errors.KeyNotFoundError:  # not written yet
            return 0
        return int(day["total"]["input_tokens"] + day["total"]["output_tokens"])
    finally:
        await nc.close()


async def test_redis_losing_its_data_keeps_the_tenant_day_exact(infra, mesh):
    """Reservations are never released one by one: a settled call's hold stays in the bucket
    (a day), and a view rebuilt after Redis lost its data must not count it a second time beside
    the day's spend, nor forget a hold whose call is still running. Tenant initech may spend
    1,000 tokens a day: 400 settled (task A), 100 settled by a retried attempt under another
    reservation id (task B), 300 held in flight (task B): a new task gets exactly the 200 left."""
    t, size = "initech", 100
    for task in ("day-a", "day-b", "day-c"):
        await infra.running_task(task, 10_000, tenant=t)
    async with infra.connected_as("worker") as worker:
        a = [await worker.request(reserve("day-a", f"a{i}", size, t)) for i in range(4)]
        b = [await worker.request(reserve("day-b", call, size, t)) for call in ("b0", "b1", "b2", "b3-r1n2")]
        assert all(isinstance(x, BudgetGranted) for x in a + b), a + b
        await asyncio.gather(*(worker.publish(used("day-a", f"a{i}", 60, 40, t), key=f"a{i}") for i in range(4)))
        await worker.publish(used("day-b", "b3", 60, 40, t, reservation="b3-r1n2"), key="b3")
        deadline = time.monotonic() + 10
        while await _day_spent(infra, t) < 500:
            assert time.monotonic() < deadline, "the five calls were not accounted"
            await asyncio.sleep(0.05)
        assert await wipe_budget_redis(infra) > 0
        c = [await worker.request(reserve("day-c", f"c{i}", size, t)) for i in range(3)]
    assert [type(x).__name__ for x in c] == ["BudgetGranted", "BudgetGranted", "BudgetDenied"], c
    assert c[-1].code == "tenant_daily_tokens" and "0 available today" in c[-1].reason, c[-1]
    report("budget redis lost, tenant-day", settled=500, held=300, granted_after_loss=2, overshoot_tokens=0)


async def test_control_is_obeyed_everywhere_and_the_kill_switch_stops_one_tenant(infra, mesh):
    nc = await infra.admin()
    control = await nc.jetstream().key_value("control")
    await control.put("kill.tenant.acme", json.dumps({"reason": "incident 42", "by": "admin"}).encode())
    try:
        mine, other = await run_beside(infra, "acme", GOAL, "killed-1", TaskLimits())
    finally:
        await control.delete("kill.tenant.acme")
    assert (
        isinstance(mine.outcome, TaskFailed) and "kill switch (tenant acme) is on: incident 42" in mine.outcome.reason
    )
    assert (await infra.spent("acme", "killed-1"))["total"]["calls"] == 0, "not one model call was made"
    assert isinstance(other.outcome, TaskCompleted), "other tenants keep working"
    async with infra.client("acme") as c:
        again = await c.submit(GOAL, task_id="killed-2", timeout=60)
    assert isinstance(again.outcome, TaskCompleted), "switched off: work resumes"
    await nc.close()


async def test_a_task_with_no_progress_is_flagged_as_stalled_and_cancelled(infra, mesh):
    for name in mesh.names("tool-executor"):
        mesh.kill(name)  # nobody will ever answer the calculator call
    try:
        limits = TaskLimits(stall_timeout_s=3)
        t0 = time.monotonic()
        async with infra.client("acme") as c:
            seen = await c.submit(GOAL, task_id="stall-1", limits=limits, timeout=30)
        took = time.monotonic() - t0
    finally:
        for name in mesh.names("tool-executor"):
            await mesh.replace(name)
    assert isinstance(seen.outcome, TaskFailed) and "stalled: no progress for" in seen.outcome.reason
    assert took >= 3, f"not before its stall timeout ({took:.1f}s)"  # (when after it is a report, below)
    report("budget stall", detected_after_s=round(took, 2), reason=seen.outcome.reason[:100])


async def test_an_operator_halts_resumes_and_cancels_running_tasks_with_meshctl(infra, mesh, capsys):
    def ctl(*args: str) -> int:
        return main(["--home", str(infra.home), *args, "--tenant", "acme", "--nats-url", infra.nats_url])

    for name in mesh.names("tool-executor"):
        mesh.kill(name)  # the calculator step waits, so both tasks are mid-run when the operator acts
    async with infra.client("acme") as c:
        halted = asyncio.create_task(c.submit(GOAL, task_id="ops-halt", timeout=60))
        cancelled = asyncio.create_task(c.submit(GOAL, task_id="ops-cancel", timeout=60))
        await _started(infra, "acme", "ops-halt", "ops-cancel")  # both mid-run (run slots off here)
        assert await asyncio.to_thread(ctl, "halt", "ops-halt", "--reason", "maintenance window") == 0
        assert await asyncio.to_thread(ctl, "cancel", "ops-cancel", "--reason", "not needed") == 0
        assert "halted by client.acme: maintenance window" in capsys.readouterr().out
        for name in mesh.names("tool-executor"):
            await mesh.replace(name)  # the waiting calculator call is now refused: the task is halted
        await asyncio.sleep(1.0)
        assert not halted.done(), "a halted task waits, it does not finish"
        assert await asyncio.to_thread(ctl, "resume", "ops-halt") == 0
        halted, cancelled = await halted, await cancelled
        assert await asyncio.to_thread(ctl, "resume", "ops-halt", "--timeout", "1") == 1, "finished: nothing to do"
    assert isinstance(cancelled.outcome, TaskFailed), cancelled.outcome
    assert "cancelled by client.acme: not needed" in cancelled.outcome.reason
    assert isinstance(halted.outcome, TaskCompleted) and "391" in halted.outcome.answer, halted.outcome
    stages = [e.stage for e in halted.events]
    assert stages.index("task.halted") < stages.index("task.resumed"), stages
    assert "already finished" in capsys.readouterr().err


async def test_the_audit_chain_holds_every_writers_decisions_and_names_a_tampered_record(infra, mesh, capsys):
    """A tool-policy decision (tool-executor), a loop trip (both budget replicas see it: stored
    once), the cancel it caused (planner) and an operator's kill switch (meshctl) land in globex's
    chain; ``meshctl audit verify`` proves it whole. Then an admin rewrites history the one way the
    stream allows (it refuses deletes: re-create it): without one record, verify names that record;
    with the tail cut, the budget's anchor shows it."""

    def ctl(*args: str) -> int:
        return main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])

    loop = "Loop drill. " + plan(
        {"step_id": "s1", "kind": "compute", "tools": ["calculator"], "instruction": "#loop keep checking 1 + 1"},
    )
    email = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@globex.test."
    async with infra.client("globex") as g:
        sent, looped = await asyncio.gather(
            g.submit(email, task_id="audit-email", timeout=60), g.submit(loop, task_id="audit-loop", timeout=60)
        )
    assert isinstance(sent.outcome, TaskCompleted) and isinstance(looped.outcome, TaskFailed), looped.outcome
    assert await asyncio.to_thread(ctl, "kill-switch", "on", "--tenant", "globex", "--reason", "audit drill") == 0
    assert await asyncio.to_thread(ctl, "kill-switch", "off", "--tenant", "globex") == 0
    admin = await infra.admin()
    try:
        # The planner records a control action just after applying it.
        deadline = time.monotonic() + 10
        while not [s for s in await audit.chain(admin, "globex") if b'"control.cancel"' in s.data]:
            assert time.monotonic() < deadline, f"no control.cancel record; the task ended: {looped.outcome.reason}"
            await asyncio.sleep(0.2)
        head = await _anchored(admin, "globex")
        capsys.readouterr()
        assert await asyncio.to_thread(ctl, "audit", "verify", "--tenant", "globex", "--json") == 0
        verdict = json.loads(capsys.readouterr().out)
        assert verdict["whole"] and verdict["stream_protected"] and verdict["anchors"] >= 1, verdict
        kinds = verdict["kinds"]
        kept = f"{verdict['head']['n']}:{verdict['head']['hash']}"  # a head an auditor keeps elsewhere
        assert await asyncio.to_thread(ctl, "audit", "verify", "--tenant", "globex", "--anchor", kept) == 0
        assert "whole" in capsys.readouterr().out
        assert kinds.get("budget.loop") == 1, f"two budget replicas, one record: {kinds}"
        assert kinds.get("control.cancel") == 1 and kinds.get("control.kill-switch-on") == 1, kinds
        assert kinds.get("control.kill-switch-off") == 1 and any(k.startswith("tool.") for k in kinds), kinds
        assert await asyncio.to_thread(ctl, "audit", "chain", "--tenant", "globex", "--task", "audit-loop") == 0
        listing = capsys.readouterr().out
        assert "budget.loop" in listing and "control.cancel" in listing and "tool." not in listing, listing

        stored = await audit.chain(admin, "globex")
        tool = next(json.loads(s.data)["n"] for s in stored if json.loads(s.data)["kind"].startswith("tool."))
        everything = await audit.stored(admin, "AUDIT", "audit.>")

        def globex_n(s) -> int:
            return json.loads(s.data)["n"] if s.subject.startswith("audit.v1.globex.") else 0

        # Past the clock skew allowed, so the stream is visibly younger than its first record.
        last_at = max(json.loads(s.data)["at"] for s in stored)
        await asyncio.sleep(max(0.0, last_at + CLOCK_SKEW_S + 1 - time.time()))
        verifier = Verifier(TrustBundle.from_file(infra.ids.trust_bundle))

        async def verdict_of_stored():  # what the stream now holds, the stream's age aside
            info = await admin.jetstream().stream_info("AUDIT")
            return verify("globex", await audit.chain(admin, "globex"), verifier,
                          await audit.anchors(admin, "globex"), stream_first_seq=info.state.first_seq)  # fmt: skip

        await _rewrite(admin, [s for s in everything if globex_n(s) != tool])
        assert await asyncio.to_thread(ctl, "audit", "verify", "--tenant", "globex") == 1
        out = capsys.readouterr().out
        first = 1 if tool != 1 else 2
        assert f"BROKEN at record {first}: record {first} was written" in out and "re-created and the record" in out
        v = await verdict_of_stored()
        assert v.broken_at == tool and v.reason.startswith(f"record {tool} missing"), v.reason

        await _rewrite(admin, [s for s in everything if globex_n(s) <= head - 2])
        assert await asyncio.to_thread(ctl, "audit", "verify", "--tenant", "globex") == 1
        assert "re-created" in capsys.readouterr().out
        v = await verdict_of_stored()
        assert f"the chain ends at record {head - 2}" in v.reason and "tail was cut" in v.reason, v.reason
        report("audit chain", records=verdict["records"], kinds=len(kinds), anchors=verdict["anchors"])
    finally:
        await admin.close()


async def _anchored(admin, tenant: str) -> int:
    """Wait for the budget to anchor the chain's current head (MESH_BUDGET_AUDIT_ANCHOR_S=1)."""
    deadline = time.monotonic() + 15
    while True:
        stored = await audit.chain(admin, tenant)
        n = json.loads(stored[-1].data)["n"] if stored else 0
        anchors = await audit.anchors(admin, tenant)
        if anchors and n and f'"n":{n},' in _claims(anchors[-1].statement):
            return n
        assert time.monotonic() < deadline, f"no anchor of record {n} within 15 s"
        await asyncio.sleep(0.3)


def _claims(statement: str) -> str:
    import base64

    body = statement.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode().replace(" ", "")


async def _rewrite(admin, keep: list) -> None:
    """What an admin who wants a record gone must do: delete the stream, provision it again,
    publish back what is to stay (bodies and signed headers as they were)."""
    js = admin.jetstream()
    await js.delete_stream("AUDIT")
    await provision(admin)
    for s in keep:
        headers = {k: v for k, v in s.headers.items() if k == "Nats-Msg-Id" or not k.startswith("Nats-")}
        await js.publish(s.subject, s.data, headers=headers, stream="AUDIT")
