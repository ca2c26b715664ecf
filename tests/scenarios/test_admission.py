"""Admission at the door, through the real mesh: a tenant over its tasks in flight or its
submissions per second is refused at once with a machine-readable code and a retry-after;
everything admitted completes; another tenant is not refused because of it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted, TaskRejected
from mesh_contracts.v1.records import AdmissionRecord
from mesh_testing.chaos import PLANNER, WORKER, ChaosMesh, latencies, overtaken, report, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
LIMITS = {
    "acme": {"max_in_flight": 4, "rate_per_s": 0},
    "initech": {"rate_per_s": 0.2, "burst": 2},
    "umbrella": {"max_in_flight": 40, "rate_per_s": 0},
}
ENV = {
    "MESH_ACK_WAIT_S": "2",
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_ADMISSION_TENANTS": json.dumps(LIMITS),
}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex", "initech", "umbrella"], name="admission", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


async def test_a_burst_over_the_in_flight_limit_is_refused_at_once_and_nothing_admitted_is_lost(infra, mesh):
    async with infra.client("acme") as c, infra.client("globex") as g:
        burst = [c.submit(GOAL, task_id=f"burst-{i}", progress=False, timeout=90) for i in range(30)]
        beside = g.submit(GOAL, task_id="beside-burst", progress=False, timeout=90)
        *seen, other = await asyncio.gather(*burst, beside)

    refused = [s for s in seen if isinstance(s.outcome, TaskRejected)]
    done = [s for s in seen if isinstance(s.outcome, TaskCompleted)]
    assert len(refused) + len(done) == 30, [type(s.outcome).__name__ for s in seen if s not in refused + done]
    assert len(done) >= 4, "at least the first four were admitted"
    assert refused, "a burst of 30 against a limit of 4 in flight is refused in part"
    for s in refused:
        r = s.outcome
        assert isinstance(r, TaskRejected) and r.code == "too_many_in_flight", r
        assert r.retry_after_s is not None and 0 < r.retry_after_s <= 60 and "acme" in r.reason
    assert isinstance(other.outcome, TaskCompleted), "globex is not refused because acme is over its limit"

    record = await _admission(infra, "acme")
    assert record.in_flight == {}, "every admitted task was released when it ended"
    assert record.admitted == len(done) and record.refused == {"too_many_in_flight": len(refused)}

    async with infra.client("acme") as c:  # the slots are free again
        again = await c.submit(GOAL, task_id="after-burst", progress=False, timeout=60)
    assert isinstance(again.outcome, TaskCompleted)


async def test_submissions_over_the_rate_are_refused_with_the_wait_that_would_admit_them(infra, mesh):
    async with infra.client("initech") as c:
        seen = await asyncio.gather(
            *(c.submit(GOAL, task_id=f"rate-{i}", progress=False, timeout=60) for i in range(5))
        )
    codes = sorted(type(s.outcome).__name__ + ":" + getattr(s.outcome, "code", "") for s in seen)
    assert codes == ["TaskCompleted:", "TaskCompleted:"] + ["TaskRejected:rate_limited"] * 3, codes
    waits = sorted(s.outcome.retry_after_s or 0 for s in seen if isinstance(s.outcome, TaskRejected))
    # A token every 5 s, the next one within 5 s: each refused client is given a token of its own,
    # in turn, instead of all being sent back for the next one (mesh_tenancy.retry_after).
    assert all(5.0 * k <= w <= 5.0 * (k + 2) for k, w in enumerate(waits)) and len(set(waits)) == 3, waits


async def test_meshctl_submit_says_why_and_when_to_retry(infra, mesh, capsys):
    async with infra.client("initech") as c:  # spend initech's tokens (one comes back every 5 s)
        await asyncio.gather(*(c.submit(GOAL, task_id=f"spend-{i}", progress=False, timeout=60) for i in range(3)))
    code = await asyncio.to_thread(
        main,
        ["--home", str(infra.home), "submit", GOAL, "--tenant", "initech", "--follow", "--nats-url", infra.nats_url],
    )
    err = capsys.readouterr().err
    assert code == 4 and "(rate_limited)" in err and "retry after" in err, err


async def test_a_quiet_tenant_is_not_starved_by_another_tenants_burst(infra, mesh):
    """Every service takes the tenants in turn (``mesh_kit.fair``): while umbrella's 80
    submissions (40 in flight at most) drain, each of globex's tasks, run one after another, is
    taken up by the planner and its step by the worker after at most a turn's worth of
    umbrella's work (the handlers that were busy when it arrived, and one turn), never behind
    the burst's backlog as in stored order. Said in the broker's order of events, so a slow
    machine cannot fail it; how long globex waited is ``bench/bench_admission.py``'s business."""
    ids: list[str] = []
    async with infra.client("globex") as g, infra.client("umbrella") as u:
        await latencies(g, GOAL, 2, warm=True)
        burst = [asyncio.create_task(u.submit(GOAL, progress=False, timeout=300)) for _ in range(80)]
        await asyncio.sleep(0.5)  # the burst is queued everywhere first
        under = await latencies(g, GOAL, 12, while_=lambda: not all(b.done() for b in burst), timeout=120, ids=ids)
        outcomes = [(await b).outcome for b in burst]
    assert all(isinstance(o, (TaskCompleted, TaskRejected)) for o in outcomes), "nothing admitted was lost"
    planner = await overtaken(infra, PLANNER, "globex", ids, "umbrella")
    worker = await overtaken(infra, WORKER, "globex", ids, "umbrella")
    report("fairness, turns", planner=planner, worker=worker, burst=len(outcomes))
    assert len(under) >= 3, (under, planner, worker)  # (1 in stored order: it waited for the burst)
    # planner: the plans in progress when it came (its planning slots, MESH_MAX_WORKERS - 1) and
    # the handlers' turn; worker: its handlers (MESH_MAX_WORKERS) and one turn
    assert max(planner) <= 3 + 4 + 1, planner  # (+1: a plan finishing as its submission is stored)
    assert max(worker) <= 4 + 1, worker


async def _admission(infra: Infra, tenant: str) -> AdmissionRecord:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value(AdmissionRecord.bucket)
        return AdmissionRecord.model_validate_json((await kv.get(tenant)).value)
    finally:
        await nc.close()


async def test_queue_time_is_not_a_stall_and_a_task_queued_past_its_max_queue_s_is_cancelled(infra, mesh, capsys):
    """With no worker running a task's steps wait in the queue: neither a 2 s stall timeout nor
    anything else ends it while it waits, the budget reports it queued, and at its own
    ``max_queue_s`` (6 s) it is cancelled for exactly that. Runs last: it stops the worker."""
    import httpx

    (worker,) = mesh.names("worker")
    mesh.kill(worker)
    try:
        args = ["--home", str(infra.home), "submit", "Compute 17 * 23.", "--tenant", "globex", "--task-id",
                "queued-1", "--stall-timeout", "2", "--max-queue", "6", "--follow", "--json", "--timeout", "60",
                "--nats-url", infra.nats_url]  # fmt: skip
        run = asyncio.create_task(asyncio.to_thread(main, args))
        budget = mesh.procs[mesh.names("budget")[0]][1]

        async def globex() -> dict:
            async with httpx.AsyncClient(timeout=2) as client:
                status = (await client.get(f"http://127.0.0.1:{budget.http_port}/status")).json()
            return status.get("tenants", {}).get("globex", {})

        deadline = time.monotonic() + 20
        while (await globex()).get("queued", 0) < 1:
            assert time.monotonic() < deadline, "the budget never reported the task queued"
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)  # past the stall timeout: still queued, not stalled
        assert not run.done(), "a task waiting in a queue is not a stall"
        assert (await globex())["queued"] == 1 and (await globex())["queued_s"] > 3
        code = await run
    finally:
        await mesh.replace(worker)
    out = json.loads(capsys.readouterr().out)
    assert code != 0 and out["outcome"]["type"] == "task.failed", out
    reason = out["outcome"]["reason"]
    assert "queued too long" in reason and "max_queue_s 6" in reason, reason
