"""The live view and the standard metrics, on a busy mesh (issue 19).

``meshctl top`` reads everything from NATS as the admin (the budget's own view through a signed
``budget.status`` request, not a local ``/status``), so a frame taken while tasks complete, wait
for a person, fail at a ceiling, trip a breaker and queue behind a stopped worker must show each
of them. The services export their metrics over OTLP, as they would to a collector: the OTel
GenAI client metrics and the budget's spend, charged to the task's team label, must arrive.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from nats.js.errors import NoKeysError

from mesh_contracts.v1 import TaskCompleted, TaskFailed, TaskLimits, TaskPolicy
from mesh_testing.chaos import ChaosMesh
from mesh_testing.infra import Infra, running_infra
from mesh_testing.otlp import TraceBackend
from meshctl import audit
from meshctl.cli import main

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
EMAIL = f"{GOAL} Then email the answer to ops@acme.test."
ENV = {
    "MESH_ACK_WAIT_S": "2",
    "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]",
    "MESH_LOG_LEVEL": "WARNING",
    "MESH_TOOL_POLICY": '{"send_email": {"needs_approval": true}}',  # every email waits for a person
    "MESH_APPROVAL_TIMEOUT_S": "600",
}


def plan(*steps: dict) -> str:
    return "PLAN: " + json.dumps({"steps": list(steps)})


LOOP = "Loop drill. " + plan(
    {"step_id": "s1", "kind": "compute", "tools": ["calculator"], "instruction": "#loop keep checking 1 + 1"},
    {"step_id": "s2", "kind": "answer", "tools": [], "depends_on": ["s1"], "instruction": "Write the answer"},
)


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="live-view", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def backend() -> Iterator[TraceBackend]:
    with TraceBackend() as b:
        yield b


@pytest.fixture(scope="module")
def mesh(infra, backend) -> Iterator[ChaosMesh]:
    m = ChaosMesh(infra, env={**ENV, **backend.exporting()})
    m.start()
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


def _top(infra: Infra, capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["--home", str(infra.home), "top", *args, "--nats-url", infra.nats_url]) == 0
    return capsys.readouterr().out


async def _until(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def _pending_approvals(infra: Infra, task_id: str) -> list[dict]:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value("approvals")
        out = []
        for key in await kv.keys():
            rec = json.loads((await kv.get(key)).value)
            if rec.get("task_id") == task_id and rec.get("status") == "pending":
                out.append(rec)
        return out
    except NoKeysError:  # nothing waits yet
        return []
    finally:
        await nc.close()


async def test_top_shows_a_busy_mesh_each_tenants_running_queued_waiting_failed_and_its_trips(infra, mesh, capsys):
    async with infra.client("acme") as acme, infra.client("globex") as globex:
        done = await acme.submit(GOAL, task_id="busy-done", progress=False, timeout=60)
        assert isinstance(done.outcome, TaskCompleted), done.outcome
        # Waits for a person: its email is held, and the step waits for the decision.
        await acme.submit(EMAIL, task_id="busy-held", policy=TaskPolicy(on_held="wait", judge=False), follow=False)
        await _until("the held email's approval", lambda: _pending_approvals(infra, "busy-held"))
        # Stopped by a ceiling: its plan alone would pass 100 tokens.
        capped = await acme.submit(GOAL, task_id="busy-capped", limits=TaskLimits(max_tokens=100), progress=False,
                                   timeout=60)  # fmt: skip
        assert isinstance(capped.outcome, TaskFailed) and "task_tokens" in capped.outcome.reason, capped.outcome
        # Stopped by a breaker.
        looped = await globex.submit(LOOP, task_id="busy-loop", progress=False, timeout=60)
        assert isinstance(looped.outcome, TaskFailed) and "loop" in looped.outcome.reason, looped.outcome
        # Queued: nothing takes their steps while the worker is down.
        (worker,) = mesh.names("worker")
        mesh.kill(worker)
        try:
            for i in range(2):
                await globex.submit(GOAL, task_id=f"busy-queued-{i}", follow=False)

            async def queued() -> dict | None:
                frame = json.loads(await asyncio.to_thread(_top, infra, capsys, "--json"))
                return frame if frame["tenants"].get("globex", {}).get("queued", 0) >= 2 else None

            frame = await _until("top to show globex's two queued tasks", queued)
            out = await asyncio.to_thread(_top, infra, capsys, "--once")
        finally:
            await mesh.replace(worker)

    a, g = frame["tenants"]["acme"], frame["tenants"]["globex"]
    assert a["completed"] >= 1 and a["failed"] >= 1, a
    assert a["approvals_waiting"] >= 1 and a["in_flight"] >= 1 and a["running"] >= 1, (
        "the held task is in flight and running: waiting for a person is not a queue",
        a,
    )
    assert g["queued"] >= 2 and g["failed"] >= 1 and g["in_flight"] >= 2, g
    # Both steps wait for a worker: stored and not delivered, or delivered to the killed worker's
    # pull request still open on the server in the moment after the kill (then in flight until
    # ack_wait; CI saw pending 1, in flight 1).
    w = frame["services"]["worker"]
    assert w["pending"] + w["in_flight"] >= 2, w
    assert frame["trips"].get("loop", 0) >= 1 and frame["trips"].get("ceiling", 0) >= 1, frame["trips"]
    assert any(m["calls"] >= 1 for m in frame["models"]["acme"].values()), frame["models"]
    assert frame["dlq"] == 0 and not frame["notes"], frame["notes"]
    assert "QUEUED" in out and "RUNNING" in out and "loop 1" in out and "ceiling 1" in out, out

    # The ceiling is a brake like the others: a link of the tenant's audit chain, signed by the budget.
    admin = await infra.admin()
    try:
        records = [json.loads(s.data) for s in await audit.chain(admin, "acme")]
    finally:
        await admin.close()
    ceilings = [r for r in records if r["kind"] == "budget.ceiling" and r["task_id"] == "busy-capped"]
    assert len(ceilings) == 1 and ceilings[0]["detail"]["code"] == "task_tokens", ceilings
    assert ceilings[0]["actor"] == "budget", ceilings
    args = ["--home", str(infra.home), "audit", "verify", "--tenant", "acme", "--nats-url", infra.nats_url]
    assert await asyncio.to_thread(main, args) == 0, "the chain with the ceiling in it verifies whole"


async def test_the_genai_client_metrics_and_the_teams_spend_reach_the_collector(infra, mesh, backend):
    async with infra.client("acme") as c:
        run = await c.submit(GOAL, task_id="metered", labels={"team": "support", "user": "u-17"}, progress=False,
                             timeout=60)  # fmt: skip
    assert isinstance(run.outcome, TaskCompleted), run.outcome

    def arrived() -> bool:
        cost = backend.metric("mesh.budget.cost")
        return any(p["attributes"].get("mesh.label.team") == "support" for p in cost)

    async def check() -> bool:
        return arrived()

    await _until("the budget's spend charged to team support", check, timeout=20)
    wanted = {("worker", "input"), ("worker", "output"), ("planner", "input"), ("checker", "output")}

    def by_service() -> set[tuple[str, str]]:
        return {
            (p["service"], p["attributes"].get("gen_ai.token.type"))
            for p in backend.metric("gen_ai.client.token.usage")
        }

    async def every_service_exported() -> bool:  # each service exports on its own clock
        return wanted <= by_service()

    await _until("the token usage of worker, planner and checker", every_service_exported, timeout=20)
    usage = backend.metric("gen_ai.client.token.usage")
    assert all(p["kind"] == "histogram" and p["count"] >= 1 and p["unit"] == "{token}" for p in usage), usage
    assert all(p["attributes"].get("gen_ai.operation.name") == "chat" for p in usage), usage
    assert all(p["attributes"].get("gen_ai.provider.name") for p in usage), usage
    duration = backend.metric("gen_ai.client.operation.duration")
    assert {p["service"] for p in duration} >= {"planner", "worker", "checker"}, duration
    assert all(p["unit"] == "s" and p["sum"] >= 0 for p in duration), duration
    cost = [p for p in backend.metric("mesh.budget.cost") if p["attributes"].get("mesh.label.team") == "support"]
    assert cost and all(p["service"] == "budget" and p["value"] > 0 for p in cost), cost
    assert all("mesh.label.user" not in p["attributes"] for p in cost), "only the labels chosen for metrics"
