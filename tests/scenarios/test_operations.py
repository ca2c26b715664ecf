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
def mesh(infra) -> Iterator[ChaosMesh]:
    m = ChaosMesh(infra, env=ENV)
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
