"""One task end to end across the six real services (separate processes, own identities).

Infrastructure comes from the mesh_testing plugin: nats-server and redis-server in locally
built containers when a Docker engine is reachable, otherwise the same binaries as local
processes. The test bodies are identical either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import nats.js.errors
import pytest

from mesh_contracts.v1 import TaskCompleted, TaskRejected
from mesh_kit import envelope as env
from meshctl.dlq import entries

pytestmark = pytest.mark.e2e
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DOCS = {p.name for p in (ROOT / "services/rag/mesh_rag/sample_docs").glob("*.md")}


async def budget_usage(mesh, tenant: str, task_id: str) -> dict:
    nc = await mesh.infra.admin()
    try:
        kv = await nc.jetstream().key_value("budget")
        deadline = time.monotonic() + 10
        while True:  # the budget service consumes the usage stream asynchronously
            try:
                usage = json.loads((await kv.get(f"usage.{tenant}.{task_id}")).value)
                if usage["total"]["calls"] >= 7 or time.monotonic() > deadline:  # the sample task makes 7
                    return usage
            except nats.js.errors.KeyNotFoundError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def test_a_task_runs_through_every_service_and_is_accounted(e2e_mesh):
    async with e2e_mesh.infra.client("acme") as c:
        seen = await c.submit(GOAL, timeout=60)
    assert isinstance(seen.outcome, TaskCompleted), seen.outcome
    out = seen.outcome
    assert "391" in out.answer, "the tool call's result reached the answer"
    assert out.citations and {c.doc_id for c in out.citations} <= SAMPLE_DOCS, "cited passages come from the index"
    assert all(f"[{c.doc_id}#{c.chunk_id}]" in out.answer for c in out.citations)
    # planner 1, s1 1 (the worker searches before the model's first turn; the model answers),
    # s2 2 (calculator, answer), s3 1, the checker's judge 1
    assert out.steps == 3 and out.usage.calls == 6 and out.usage.total_tokens > 0
    assert out.tools == ("search_docs", "calculator") and out.judge_score is not None
    assert out.prompt_versions["planner"].startswith("planner.plan@")
    assert out.prompt_versions["worker"].startswith("worker.system@")
    assert out.prompt_versions["judge"].startswith("checker.judge@")
    assert {c.name for c in out.checks} >= {"citations_resolve", "grounded", "no_pii", "judge"}
    assert any(c.step_id == "s1" for c in out.checks), "the step results were checked too"
    sources = {e.source for e in seen.events}
    assert sources >= {"planner", "worker", "rag", "tool-executor", "checker"}, sources
    stages = [e.stage for e in seen.events]
    assert stages.index("plan.created") < stages.index("step.dispatched") < stages.index("check.verdict")
    assert not seen.rejected_messages, "every event the client saw verified against the trust bundle"
    # the budget service accounted the same calls from the usage stream, per agent
    usage = await budget_usage(e2e_mesh, "acme", seen.task_id)
    assert usage["total"]["input_tokens"] == out.usage.input_tokens
    assert usage["total"]["output_tokens"] == out.usage.output_tokens
    assert usage["by_agent"]["planner/planner"]["calls"] == 1 and usage["by_agent"]["worker/worker"]["calls"] == 4
    assert usage["by_agent"]["checker/judge"]["calls"] == 1, "the judge's call is paid for and accounted too"
    # priced from the versioned table (the scripted model has a notional price), per step too
    assert usage["total"]["cost_usd"] == pytest.approx(out.usage.cost_usd) and out.usage.cost_usd > 0
    assert set(usage["by_step"]) == {"plan", "s1", "s2", "s3", "check"}
    assert sum(s["calls"] for s in usage["by_step"].values()) == 6
    assert usage["by_step"]["s1"]["calls"] == 1, "s1's search was the worker's, not a model turn"
    # and the client saw each call as its caller recorded it, as it happened (what the budget
    # accounts from; the judge's may land after the outcome), verified like every other message
    assert len(seen.usage) >= 5 and {u.agent for u in seen.usage} >= {"planner", "worker"}
    assert {u.call_id for u in seen.usage} <= set(usage["call_ids"]), "the very calls the budget counted"
    assert not any(e.stage == "budget.usage" for e in seen.events), "no second, budget-made event per call"


async def test_a_client_that_missed_the_live_outcome_reads_the_stored_one(e2e_mesh):
    """Resubmitting a finished task id runs nothing and publishes nothing live; the client must
    still report the task's outcome (the same path it takes after missing one while reconnecting)."""
    async with e2e_mesh.infra.client("acme") as c:
        first = await c.submit(GOAL, task_id="caught-up", timeout=60)
        assert isinstance(first.outcome, TaskCompleted), first.outcome
        again = await c.submit(GOAL, task_id="caught-up", timeout=1.5)
    assert isinstance(again.outcome, TaskCompleted), "the stored outcome, read after the live wait"
    assert again.outcome.answer == first.outcome.answer
    assert not any(e.stage == "plan.created" for e in again.events), "the resubmission did not run again"


async def test_a_client_that_wants_only_the_result_hears_only_the_outcome(e2e_mesh):
    """``progress=False``: the same task and answer, without the dozens of progress events and
    token deltas a following client verifies one by one."""
    async with e2e_mesh.infra.client("acme") as c:
        full = await c.submit(GOAL, timeout=60)
        quiet = await c.submit(GOAL, timeout=60, progress=False)
    assert isinstance(quiet.outcome, TaskCompleted), quiet.outcome
    assert isinstance(full.outcome, TaskCompleted) and quiet.outcome.answer == full.outcome.answer
    assert full.events and full.tokens, "a following client sees the progress and the streamed text"
    assert quiet.events == [] and quiet.tokens == [] and quiet.rejected_messages == []


async def test_the_readme_integration_with_plain_nats_py(e2e_mesh):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples/submit_with_nats_py.py"),
        "What is 6 * 7 according to AgentMesh?",
        "--tenant",
        "globex",
        "--home",
        str(e2e_mesh.infra.home),
        "--nats-url",
        e2e_mesh.infra.nats_url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, stderr.decode()
    text = stdout.decode()
    assert "submitted t-" in text and "The result is 42." in text and "checker] check.verdict: passed" in text


async def test_malformed_tasks_are_refused_at_the_door_and_an_unknown_version_is_dead_lettered(e2e_mesh):
    """A tenant's malformed submission is refused at the door with the reason, at once, and
    nothing is stored; a stored message of a version the planner does not know (as a newer
    producer would store it) is dead-lettered with the reason and rejected to the tenant."""
    rejected: dict[str, TaskRejected] = {}

    async with e2e_mesh.infra.client("acme") as c:
        assert c.nc is not None

        async def on_msg(msg):
            body = json.loads(msg.data)
            if body["type"] == "task.rejected":
                rejected[body["task_id"]] = TaskRejected.model_validate(body)

        await c.nc.subscribe("task.*.acme.*.rejected", cb=on_msg)
        js = c.nc.jetstream()
        schema = {env.SCHEMA: "task.submitted/v1"}
        # 1. malformed JSON, from the tenant's own (legitimate) client
        with pytest.raises(nats.js.errors.APIError) as bad_json:
            await js.publish("door.task.v1.acme.bad-json.submitted", b'{"goal": "unterminated',
                             headers={env.MSG_ID: "bad-json", **schema})  # fmt: skip
        # 2. a schema violation, properly signed
        bad = json.dumps({"type": "task.submitted", "tenant": "acme", "task_id": "bad-schema"}).encode()
        token = c.signer.token(tenant="acme", msg_type="task.submitted", body=bad, msg_id="bad-schema")
        with pytest.raises(nats.js.errors.APIError) as bad_schema:
            await js.publish("door.task.v1.acme.bad-schema.submitted", bad,
                             headers={env.IDENTITY: token, env.MSG_ID: "bad-schema", **schema})  # fmt: skip
        # 3. a version this mesh does not know (as a newer producer would store it)
        admin = await e2e_mesh.infra.admin()
        v9 = json.dumps({"type": "task.submitted", "tenant": "acme", "task_id": "bad-version", "goal": "x"}).encode()
        await admin.jetstream().publish("task.v9.acme.bad-version.submitted", v9, headers={env.MSG_ID: "v9"})
        deadline = time.monotonic() + 15
        while not rejected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        letters = [m async for _, m in entries(admin.jetstream())]
        stored = []
        for task in ("bad-json", "bad-schema"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                stored.append(await admin.jetstream().get_last_msg("TASK", f"task.v1.acme.{task}.submitted"))
        await admin.close()

    assert bad_json.value.description.startswith("invalid: decode: not JSON (Unterminated string")
    assert (
        bad_schema.value.description.startswith("invalid: ") and "goal: Field required" in bad_schema.value.description
    )
    assert stored == [], "nothing refused at the door is stored"
    assert set(rejected) == {"bad-version"}
    assert "unknown contract version v9 for task.submitted (this consumer knows v1)" in rejected["bad-version"].reason
    reasons = {m.headers[env.DLQ_SUBJECT]: m.headers[env.DLQ_REASON] for m in letters if m.headers}
    assert reasons["task.v9.acme.bad-version.submitted"] == rejected["bad-version"].reason
    assert not [s for s in reasons if "bad-json" in s or "bad-schema" in s], "nor dead-lettered"
    # nothing crashed: every service is still ready
    async with httpx.AsyncClient(timeout=2) as http:
        for name, proc in e2e_mesh.services.items():
            assert (await http.get(f"http://127.0.0.1:{proc.http_port}/readyz")).status_code == 200, name


async def test_one_tenant_cannot_follow_another_tenants_tasks(e2e_mesh):
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    ids = e2e_mesh.infra.ids
    nc = await nats.connect(
        e2e_mesh.infra.nats_url,
        **ids.connect_options("client.globex"),
        error_cb=on_error,
    )
    try:
        await nc.subscribe("event.v1.acme.>")
        await nc.flush()
        deadline = time.monotonic() + 30  # returns as soon as it holds
        while not errors and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert any('permissions violation for subscription to "event.v1.acme.>"' in e for e in errors)
