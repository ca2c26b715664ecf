"""Operating the mesh after the fact, through the real mesh: ``meshctl history`` tells a task's
whole story in causal order, every sender verified, with totals that agree with the budget's own
accounting to the token and the cent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted
from mesh_testing.chaos import ChaosMesh
from mesh_testing.infra import Infra, running_infra
from mesh_testing.otlp import TraceBackend
from meshctl import budget as spend
from meshctl.cli import main

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]", "MESH_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="operations", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def backend() -> Iterator[TraceBackend]:
    b = TraceBackend().start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def mesh(infra, backend) -> Iterator[ChaosMesh]:
    # The services export their spans over OTLP as they would to a collector (flushed often).
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": backend.otlp_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    m = ChaosMesh(infra, env={**ENV, **tracing})
    m.start()
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


def _ctl(infra: Infra, *args: str) -> int:
    return main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


async def test_history_tells_a_tasks_story_in_causal_order_and_its_totals_match_the_budget(infra, mesh, capsys):
    async with infra.client("acme") as c:
        run = await c.submit(GOAL, task_id="story-1", timeout=60)
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    await asyncio.sleep(1.0)  # the last usage message accounted by the budget
    capsys.readouterr()
    assert await asyncio.to_thread(_ctl, infra, "history", "story-1", "--tenant", "acme", "--json") == 0
    h = json.loads(capsys.readouterr().out)
    msgs = h["messages"]
    types = [m["type"] for m in msgs]
    assert types[0] == "task.submitted" and "task.completed" in types
    for kind in ("plan.created", "step.requested", "step.completed", "tool.requested", "tool.completed",
                 "tool.audited", "usage.recorded", "check.requested", "check.verdict", "audit.recorded",
                 "event.progress"):  # fmt: skip
        assert kind in types, (kind, sorted(set(types)))
    assert not [m for m in msgs if m["sender"].startswith("?")], "every sender's token verified"
    senders = {m["type"]: m["sender"] for m in msgs}
    assert senders["task.submitted"] == "client.acme" and senders["plan.created"] == "planner"
    assert senders["tool.audited"] == "tool-executor" and senders["check.verdict"] == "checker"
    for i, m in enumerate(msgs):  # causal order: a message after the one that caused it
        if m["cause"] is not None:
            assert m["cause"] < i and msgs[m["cause"]]["msg_id"] == m["causation"], m
    caused = [m for m in msgs if m["cause"] is not None]
    assert len(caused) >= 0.9 * len(msgs), f"causation links the story: {len(caused)} of {len(msgs)}"
    assert "ops@acme.test" not in json.dumps(h), "tool arguments are shown redacted"

    spent = await infra.spent("acme", "story-1")
    t = h["totals"]
    assert t["outcome"] == "task.completed"
    assert t["tokens"] == spent["total"]["input_tokens"] + spent["total"]["output_tokens"], (t, spent["total"])
    assert abs(t["cost_usd"] - spent["total"]["cost_usd"]) < 1e-6
    assert t["tool_decisions"] and t["verdicts"] and t["verdicts"][-1]["passed"]

    assert await asyncio.to_thread(_ctl, infra, "history", "story-1", "--tenant", "acme", "--no-events") == 0
    out = capsys.readouterr().out
    assert "history of acme/story-1" in out and "outcome: task.completed" in out and "event.progress" not in out
    assert "send_email" in out and "tool decisions:" in out

    assert await asyncio.to_thread(_ctl, infra, "history", "story-1", "--tenant", "globex") == 1
    assert "no stored message about globex/story-1" in capsys.readouterr().err, "another tenant sees nothing"


async def test_trace_shows_a_tasks_span_tree_from_its_messages_and_from_the_trace_backend(infra, mesh, backend, capsys):
    async with infra.client("acme") as c:
        run = await c.submit(GOAL, task_id="traced-1", timeout=60)
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    capsys.readouterr()

    # From the messages alone: one trace, every hop a span, the time each service took.
    assert await asyncio.to_thread(_ctl, infra, "trace", "traced-1", "--tenant", "acme", "--json") == 0
    t = json.loads(capsys.readouterr().out)
    assert t["source"] == "messages" and len(t["trace_ids"]) == 1, t["trace_ids"]
    trace_id = t["trace_ids"][0]
    spans = t["spans"]
    assert {s["trace_id"] for s in spans} == {trace_id}, "every hop of the task stays in one trace"
    assert spans[0]["type"] == "task.submitted" and spans[0]["service"] == "client.acme", "the client starts it"
    assert t["untraced"] == 0, "no stored message of the task outside its trace"
    assert len({s["span_id"] for s in spans}) == len(spans), "each message published by its own span"
    assert {"planner", "worker", "checker", "tool-executor"} <= set(t["by_service"]), t["by_service"]
    assert all(s["after_cause_s"] is None or s["after_cause_s"] >= 0 for s in spans)
    assert await asyncio.to_thread(_ctl, infra, "trace", "traced-1", "--tenant", "acme") == 0
    out = capsys.readouterr().out
    assert f"trace {trace_id}" in out and "time from cause to effect" in out and "plan.created" in out

    # From the trace backend the services exported to: the same trace, with every span's duration.
    async def exported() -> bool:
        found = backend.trace(trace_id)
        names = {s["processID"] for s in found["data"][0]["spans"]} if found else set()
        return {"planner", "worker", "checker", "tool-executor", "budget"} <= names

    deadline = asyncio.get_running_loop().time() + 15
    while not await exported():
        assert asyncio.get_running_loop().time() < deadline, "the services' spans never reached the backend"
        await asyncio.sleep(0.2)
    args = ("trace", "traced-1", "--tenant", "acme", "--jaeger", backend.query_url)
    assert await asyncio.to_thread(_ctl, infra, *args, "--json") == 0
    j = json.loads(capsys.readouterr().out)
    assert j["source"] == "jaeger" and j["trace_ids"] == [trace_id]

    def walk(nodes, depth=0):
        for n in nodes:
            yield n, depth
            yield from walk(n["children"], depth + 1)

    nodes = list(walk(j["spans"]))
    assert len(nodes) >= len(spans), "at least a span per stored message (handlers, reservations, calls...)"
    assert max(d for _, d in nodes) >= 3, "nested across services, not a flat list"
    consumers = [n for n, _ in nodes if n["kind"] == "consumer"]
    assert {n["service"] for n in consumers} >= {"planner", "worker", "checker"}, "each handler is a span"
    for parent, _ in nodes:
        for child in parent["children"]:
            assert child["start_us"] >= parent["start_us"] - 1000, "a child starts within its parent (1 ms skew)"
    assert await asyncio.to_thread(_ctl, infra, *args) == 0
    out = capsys.readouterr().out
    assert "from the trace backend" in out and "time in handlers, by service" in out

    # A backend that is not there is a one-line error, not a traceback.
    dead = ("trace", "traced-1", "--tenant", "acme", "--jaeger", "http://127.0.0.1:9")
    assert await asyncio.to_thread(_ctl, infra, *dead) == 1
    assert "cannot reach the trace backend" in capsys.readouterr().err
    assert await asyncio.to_thread(_ctl, infra, "trace", "traced-1", "--tenant", "globex") == 1


async def test_labels_charge_a_tasks_spend_to_a_team_and_a_user(infra, mesh, capsys):
    """``meshctl submit --label``: the task record keeps them, the budget's task and tenant-day
    spend carry them (cost by ``key=value``), and ``meshctl budget`` shows them."""
    assert await asyncio.to_thread(_ctl, infra, "submit", GOAL, "--tenant", "globex", "--task-id", "charged-1",
                                   "--label", "team=support", "--label", "user=u-17", "--follow") == 0  # fmt: skip
    async with infra.client("globex") as c:
        other = await c.submit(GOAL, task_id="charged-2", labels={"team": "sales"}, timeout=60)
    assert isinstance(other.outcome, TaskCompleted)
    await asyncio.sleep(1.0)  # the last usage message accounted
    one, two = await infra.spent("globex", "charged-1"), await infra.spent("globex", "charged-2")
    assert one["labels"] == {"team": "support", "user": "u-17"} and two["labels"] == {"team": "sales"}
    capsys.readouterr()
    assert await asyncio.to_thread(_ctl, infra, "budget", "--tenant", "globex", "--json") == 0
    day = json.loads(capsys.readouterr().out)["day"]
    by = {k: v["cost_usd"] for k, v in day["by_label"].items()}
    assert abs(by["team=support"] - one["total"]["cost_usd"]) < 1e-9
    assert abs(by["user=u-17"] - one["total"]["cost_usd"]) < 1e-9
    assert abs(by["team=sales"] - two["total"]["cost_usd"]) < 1e-9
    assert await asyncio.to_thread(_ctl, infra, "budget", "--tenant", "globex") == 0
    out = capsys.readouterr().out
    assert "BY LABEL" in out and "team=support" in out and "user=u-17" in out


async def test_top_shows_each_tenants_tasks_and_spend_and_each_services_backlog(infra, mesh, capsys):
    async with infra.client("acme") as c:
        done = await c.submit(GOAL, task_id="top-1", timeout=60)
    assert isinstance(done.outcome, TaskCompleted)
    await asyncio.sleep(1.0)
    capsys.readouterr()
    assert await asyncio.to_thread(_ctl, infra, "top", "--json") == 0
    frame = json.loads(capsys.readouterr().out)
    acme = frame["tenants"]["acme"]
    assert acme["completed"] >= 1 and acme["in_flight"] == 0 and acme["failed"] == 0, acme
    admin = await infra.admin()
    try:
        day = json.loads(
            (await (await admin.jetstream().key_value("budget")).get(f"tenant.acme.{spend.today()}")).value
        )
    finally:
        await admin.close()
    assert abs(acme["cost_usd"] - day["total"]["cost_usd"]) < 1e-9, "today's spend is the budget's"
    assert set(frame["services"]) >= {"planner", "worker", "checker", "rag", "tool-executor", "budget"}
    assert all(s["pending"] == 0 for s in frame["services"].values()), "an idle mesh has no backlog"
    assert sum(m["calls"] for m in frame["models"].values()) >= 1 and frame["dlq"] == 0
    assert await asyncio.to_thread(_ctl, infra, "top", "--once") == 0
    out = capsys.readouterr().out
    assert "TENANT" in out and "acme" in out and "SERVICE" in out and "dead letters: 0" in out
