"""Operating the mesh after the fact, through the real mesh: ``meshctl history`` tells a task's
whole story in causal order, every sender verified, with totals that agree with the budget's own
accounting to the token and the cent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from mesh_contracts.v1 import TaskCompleted
from mesh_planner.service import PLAN_PROMPT
from mesh_testing.chaos import ChaosMesh, outbox_effects
from mesh_testing.infra import Infra, running_infra
from mesh_testing.otlp import TraceBackend
from meshctl import budget as spend
from meshctl.cli import main

pytestmark = pytest.mark.chaos
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23, and email the answer to ops@acme.test."
# A task that completes, for the replays that only need one: a question the docs answer and a
# computation. (Arithmetic alone gets a research step with no subject from the scripted planner;
# the worker's first retrieval, by the step's instruction, then finds passages on something else,
# the answer carries them, and the judge rightly rejects it.)
ASK_AND_COMPUTE = "How does AgentMesh avoid duplicate side effects? Also compute {}."
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_RETRY_DELAYS_S": "[0.2, 0.5, 1, 2]", "MESH_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="operations", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def backend() -> Iterator[TraceBackend]:
    with TraceBackend() as b:
        yield b


@pytest.fixture(scope="module")
def mesh(infra, backend) -> Iterator[ChaosMesh]:
    # The services export their spans over OTLP as they would to a collector (flushed often).
    tracing = backend.exporting()
    # A second version of the planning prompt, beside the one served, for replays to ask for.
    prompts_dir = infra.home / "prompts"
    prompts_dir.mkdir(exist_ok=True)
    plan = PLAN_PROMPT
    (prompts_dir / plan.id).mkdir(exist_ok=True)
    (prompts_dir / plan.id / "9.md").write_text(
        f"---\nid: {plan.id}\nversion: 9\n---\n{plan.text}\nPrefer fewer, larger steps.\n"
    )
    m = ChaosMesh(infra, env={**ENV, **tracing, "MESH_PROMPTS_DIR": str(prompts_dir)})
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

    def walk(nodes, depth=0):
        for n in nodes:
            yield n, depth
            yield from walk(n["children"], depth + 1)

    # A handler's span ends after the spans it made: it can reach the backend in a later batch
    # than the rest of its service's spans, so wait for it too.
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        assert await asyncio.to_thread(_ctl, infra, *args, "--json") == 0
        j = json.loads(capsys.readouterr().out)
        nodes = list(walk(j["spans"]))
        consumers = [n for n, _ in nodes if n["kind"] == "consumer"]
        if {n["service"] for n in consumers} >= {"planner", "worker", "checker"} and len(nodes) >= len(spans):
            break
        assert asyncio.get_running_loop().time() < deadline, f"each handler is a span: {consumers}"
        await asyncio.sleep(0.2)
    assert j["source"] == "jaeger" and j["trace_ids"] == [trace_id]
    assert {n["service"] for n in consumers} >= {"planner", "worker", "checker"}, "each handler is a span"
    assert len(nodes) >= len(spans), "at least a span per stored message (handlers, reservations, calls...)"
    assert max(d for _, d in nodes) >= 3, "nested across services, not a flat list"
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
    assert sum(m["calls"] for m in frame["models"]["acme"].values()) >= 1 and frame["dlq"] == 0
    assert acme["running"] == 0 and acme["queued"] == 0 and not frame["notes"], "the budget answered: nothing runs"
    assert await asyncio.to_thread(_ctl, infra, "top", "--once") == 0
    out = capsys.readouterr().out
    assert "TENANT" in out and "acme" in out and "SERVICE" in out and "dead letters: 0" in out


def _replay(infra: Infra, capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = _ctl(infra, "replay", *args, "--tenant", "acme", "--json")
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


async def test_replay_with_recorded_answers_repeats_the_task_for_free_and_sends_no_email(infra, mesh, capsys):
    async with infra.client("acme") as c:
        run = await c.submit(GOAL, task_id="replay-1", timeout=60, labels={"team": "support"})
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    emails = await outbox_effects(infra, "acme")
    assert emails["replay-1"] == 1

    code, r = await asyncio.to_thread(_replay, infra, capsys, "replay-1", "--task-id", "replay-1-rec")
    assert code == 0, r
    assert r["replay"] == {"of": "replay-1", "recorded": ["plan", *[s.split()[0] for s in r["original"]["plan"]],
                                                         "check"], "route": "", "prompts": {}}  # fmt: skip
    was, now = r["original"], r["replayed"]
    assert now["outcome"] == "task.completed" and r["same_behaviour"], r["diff"]
    for name in ("plan", "tools", "answer", "verdict", "prompts"):
        assert r["diff"][name]["same"], (name, r["diff"][name])
    assert was["tokens"] > 0 and was["paid_calls"] >= 4
    assert now["tokens"] == 0 and now["paid_calls"] == 0 and now["cost_usd"] == 0, "recorded answers cost nothing"
    assert not r["diff"]["cost"]["same"]
    assert now["live_calls"] == [], "every call found its recording"
    email = [t for t in now["tools"] if " send_email(" in t]
    assert len(email) == 1 and email[0].endswith("[dry run]"), now["tools"]
    assert next(t for t in now["tools"] if " calculator(" in t).endswith("-> 391"), "read tools really run"
    # The email was not sent again; the replay's own audit says why.
    assert (await outbox_effects(infra, "acme"))["replay-1-rec"] == 0
    assert await asyncio.to_thread(_ctl, infra, "history", "replay-1-rec", "--tenant", "acme", "--json") == 0
    h = json.loads(capsys.readouterr().out)
    audited = [m["body"] for m in h["messages"] if m["type"] == "tool.audited" and m["body"]["tool"] == "send_email"]
    assert (
        audited
        and audited[0]["decided_by"] == "replay"
        and "dry run in a replay of replay-1" in audited[0]["reasons"][0]
    )
    assert not [m for m in h["messages"] if m["type"] in ("usage.recorded", "approval.requested")]
    stages = [m["body"]["stage"] for m in h["messages"] if m["type"] == "event.progress"]
    assert "task.replay" in stages
    assert (await infra.spent("acme", "replay-1-rec"))["total"]["calls"] == 0, "the budget accounted nothing"

    # The text view names what changed and what did not.
    capsys.readouterr()
    assert await asyncio.to_thread(_ctl, infra, "replay", "replay-1", "--tenant", "acme", "--fail-on-change") == 0
    out = capsys.readouterr().out
    assert "answer   same" in out and "cost     CHANGED" in out and "behaviour: the same" in out, out


async def test_replay_from_a_step_on_another_route_calls_the_model_from_there_and_says_what_changed(
    infra, mesh, capsys
):
    async with infra.client("acme") as c:
        run = await c.submit(GOAL, task_id="replay-2", timeout=60)
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    code, first = await asyncio.to_thread(_replay, infra, capsys, "replay-2", "--task-id", "replay-2-all")
    steps = [s.split()[0] for s in first["original"]["plan"]]
    last = steps[-1]

    code, r = await asyncio.to_thread(_replay, infra, capsys, "replay-2", "--from", last, "--model", "judge")
    assert code == 0, r
    assert r["replay"]["recorded"] == ["plan", *steps[:-1]] and r["replay"]["route"] == "judge"
    now = r["replayed"]
    assert now["outcome"] == "task.completed", now
    assert now["paid_calls"] >= 2 and now["tokens"] > 0, "the last step and the judge called the model"
    assert now["models"] == ["scripted/scripted-judge"], now["models"]
    assert not r["diff"]["models"]["same"] and r["diff"]["plan"]["same"]

    # A route no service has: the replay fails with the reason, and the gate says so.
    capsys.readouterr()
    code = await asyncio.to_thread(_ctl, infra, "replay", "replay-2", "--tenant", "acme", "--live", "--model",
                                   "nosuch", "--fail-on-change")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "no model route 'nosuch'" in out and "behaviour: CHANGED" in out, out


async def test_replay_refuses_what_it_cannot_replay_in_one_line(infra, mesh, capsys):
    capsys.readouterr()
    assert await asyncio.to_thread(_ctl, infra, "replay", "never-was", "--tenant", "acme") == 2
    err = capsys.readouterr().err.strip()
    assert err == "meshctl: no stored message about acme/never-was", err
    async with infra.client("acme") as c:
        run = await c.submit(ASK_AND_COMPUTE.format("2 * 21"), task_id="replay-3", timeout=60)
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    assert await asyncio.to_thread(_ctl, infra, "replay", "replay-3", "--tenant", "acme", "--from", "nope") == 2
    err = capsys.readouterr().err.strip()
    assert "no step 'nope' in the plan of replay-3 (steps: " in err and "\n" not in err, err
    assert await asyncio.to_thread(_ctl, infra, "replay", "replay-3", "--tenant", "globex") == 2
    assert "no stored message about globex/replay-3" in capsys.readouterr().err, "another tenant's task is not found"


async def test_replay_on_another_prompt_version_records_it_and_a_missing_version_fails_naming_the_file(
    infra, mesh, capsys
):
    async with infra.client("acme") as c:
        run = await c.submit(ASK_AND_COMPUTE.format("6 * 7"), task_id="replay-4", timeout=60)
    assert isinstance(run.outcome, TaskCompleted), run.outcome
    code, r = await asyncio.to_thread(_replay, infra, capsys, "replay-4", "--prompt-version", f"{PLAN_PROMPT.id}@9")
    assert code == 0, r
    assert r["replay"]["recorded"] == [] and r["replay"]["prompts"] == {PLAN_PROMPT.id: "9"}
    prompts = r["diff"]["prompts"]
    assert not prompts["same"] and prompts["was"]["planner"] == PLAN_PROMPT.ref
    assert prompts["now"]["planner"].startswith(f"{PLAN_PROMPT.id}@9+") and r["replayed"]["outcome"] == "task.completed"
    assert r["replayed"]["paid_calls"] > 0, "live calls"

    capsys.readouterr()
    code = await asyncio.to_thread(_ctl, infra, "replay", "replay-4", "--tenant", "acme", "--prompt-version",
                                   f"{PLAN_PROMPT.id}@7")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "task.failed" in out and f"put {PLAN_PROMPT.id}/7.md in its MESH_PROMPTS_DIR" in out, out
    with pytest.raises(SystemExit) as bad:  # argparse: usage and the one-line reason, exit 2
        _ctl(infra, "replay", "replay-4", "--tenant", "acme", "--prompt-version", "no-dots@1")
    assert bad.value.code == 2 and "invalid prompt version 'no-dots@1'" in capsys.readouterr().err
