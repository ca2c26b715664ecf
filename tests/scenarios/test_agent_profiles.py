"""Agent profiles through the real mesh (issue 48, item 1): an author of a tenant defines a named
agent as data (``meshctl agent add``); a task submitted to it, a model's plan naming it and a
workflow's agent node all run their step as that agent, pinned to the version current when the
task was planned: its instructions in the worker's system prompt, its tools and no others; every
change is an author's right and on the tenant's audit chain; another tenant can neither see nor
use it. A profile naming a worker pool runs on that pool's own deployment only (its identity,
its durables), and the shared workers never take its steps."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_contracts.registry import open_body
from mesh_contracts.stored import STEP_RUN, open_stored
from mesh_contracts.v1 import PlanCreated, TaskCompleted, TaskFailed, TaskPolicy
from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra
from meshctl.cli import main as cli_main
from meshctl.client import TenantClient

pytestmark = pytest.mark.chaos
ENV = {"MESH_ACK_WAIT_S": "2", "MESH_LOG_LEVEL": "WARNING"}
NO_JUDGE = TaskPolicy(judge=False)
ALICE = "author.acme.alice"
CALC = '#call: calculator {"expression": "17 * 23"}'


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme", "globex"], name="agents", ack_wait_s=2.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    with started(infra, ENV) as m:
        yield m


@pytest.fixture(scope="module")
def authors(infra, mesh) -> None:
    for person, tenant in (("alice", "acme"), ("bob", "globex")):
        assert ctl(infra, "authors", "add", person, "--tenant", tenant) == 0


def ctl(infra: Infra, *args: str) -> int:
    return cli_main(["--home", str(infra.home), *args, "--nats-url", infra.nats_url])


def add(infra: Infra, capsys, name: str, *flags: str, author: str = ALICE) -> dict[str, Any]:
    capsys.readouterr()
    rc = ctl(infra, "agent", "add", name, *flags, "--as", author, "--reason", "test", "--json")
    out = capsys.readouterr().out
    answer = json.loads(out) if out.strip() else {}
    return {"rc": rc, **answer}


def listed(infra: Infra, capsys, tenant: str) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert ctl(infra, "agent", "list", "--tenant", tenant, "--json") == 0
    out: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return out


async def submit(infra: Infra, tenant: str, task_id: str, goal: str, **kw: Any) -> Any:
    async with TenantClient.of(infra.ids, infra.nats_url, tenant) as client:
        return (await client.submit(goal, task_id=task_id, policy=NO_JUDGE, timeout=60, **kw)).outcome


async def plan_of(infra: Infra, tenant: str, task_id: str) -> PlanCreated:
    stored = await infra.stored("TASK", f"task.v1.{tenant}.{task_id}.planned")
    return PlanCreated.parse(stored[-1].data)


async def step_run(infra: Infra, tenant: str, task_id: str, step_id: str) -> dict[str, Any]:
    """The worker's checkpoint of the step: its request, messages and prompt version."""
    nc = await infra.admin()
    try:
        entry = await (await nc.jetstream().key_value("steps")).get(f"{tenant}.{task_id}.{step_id}")
    finally:
        await nc.close()
    return open_stored(entry.value or b"{}", f"{tenant}.{task_id}.{step_id}", STEP_RUN)


def test_a_task_submitted_to_a_profile_runs_as_that_agent_with_its_tools_only(infra, mesh, authors, capsys):
    put = add(infra, capsys, "calc", "--description", "Does exact arithmetic. Shows its working.",
              "--instructions", "Always state the expression you evaluated.", "--tool", "calculator",
              "--max-iterations", "3")  # fmt: skip
    assert put["rc"] == 0 and put["accepted"] and put["changed"] and len(put["version"]) == 16, put
    again = add(infra, capsys, "calc", "--description", "Does exact arithmetic. Shows its working.",
                "--instructions", "Always state the expression you evaluated.", "--tool", "calculator",
                "--max-iterations", "3")  # fmt: skip
    assert again["accepted"] and not again["changed"] and again["version"] == put["version"], "a version is its digest"
    quiet = add(infra, capsys, "quiet", "--description", "Answers from what it is given; calls no tool.")
    assert quiet["rc"] == 0 and quiet["accepted"], quiet
    profiles = {p["agent"]: p for p in listed(infra, capsys, "acme")}
    assert set(profiles) == {"calc", "quiet"} and profiles["calc"]["profile"]["tools"] == ["calculator"]

    async def main() -> None:
        done = await submit(infra, "acme", "ap-calc", CALC, agent="calc")
        assert isinstance(done, TaskCompleted), done
        assert "391" in done.answer
        plan = await plan_of(infra, "acme", "ap-calc")
        assert [(s.step_id, s.agent, s.tools) for s in plan.steps] == [
            ("s1", f"calc@{put['version']}", ("calculator",))
        ]
        run = await step_run(infra, "acme", "ap-calc", "s1")
        assert run["request"]["max_iterations"] == 3
        system = run["messages"][0]["content"]
        assert "You are calc" in system and "Always state the expression you evaluated." in system
        assert f"-agent-calc-{put['version']}" in run["prompt_version"]
        calls = await infra.stored("TOOL", "tool.v1.acme.ap-calc.requested")
        assert len(calls) == 1, "the profile's tool was offered and called once"

        # The same call asked of a profile without tools is refused in the worker: nothing is sent.
        done = await submit(infra, "acme", "ap-quiet", CALC, agent="quiet")
        assert isinstance(done, TaskCompleted | TaskFailed), done
        assert await infra.stored("TOOL", "tool.v1.acme.ap-quiet.>") == []
        said = [str(m.get("content", "")) for m in (await step_run(infra, "acme", "ap-quiet", "s1"))["messages"]]
        assert any("tool 'calculator' is not available in this step (offered: none)" in m for m in said), said

    asyncio.run(main())
    capsys.readouterr()
    assert ctl(infra, "history", "ap-calc", "--tenant", "acme") == 0
    assert f"s1 attempt 1 as calc@{put['version']}" in capsys.readouterr().out, "history says which agent ran it"


def test_a_models_plan_and_a_workflow_node_hand_steps_to_profiles_pinned_at_planning(
    infra, mesh, authors, capsys, tmp_path: Path
):
    put = add(infra, capsys, "summer", "--description", "Adds numbers.", "--tool", "calculator", "--tier", "hard")
    assert put["rc"] == 0, put
    plan = {"steps": [
        {"step_id": "s1", "kind": "compute", "instruction": CALC, "tools": ["calculator", "http_get"],
         "depends_on": [], "agent": "summer"},
        {"step_id": "s2", "kind": "answer", "instruction": "#say: done: {{s1}}", "tools": [], "depends_on": ["s1"]},
    ]}  # fmt: skip
    workflow = {
        "name": "adder",
        "description": "Add, as the summer agent.",
        "nodes": [{"id": "add", "kind": "agent", "role": "answer", "agent": "summer", "instruction": CALC}],
    }
    path = tmp_path / "adder.yaml"
    path.write_text(yaml.safe_dump(workflow))
    assert ctl(infra, "workflow", "publish", str(path), "--as", ALICE) == 0

    async def main() -> None:
        done = await submit(infra, "acme", "ap-plan", "PLAN: " + json.dumps(plan))
        assert isinstance(done, TaskCompleted), done
        steps = {s.step_id: s for s in (await plan_of(infra, "acme", "ap-plan")).steps}
        # pinned, narrowed to the profile's tools (http_get dropped), on its tier; s2 is the worker's own
        assert (steps["s1"].agent, steps["s1"].tools, steps["s1"].difficulty) == (
            f"summer@{put['version']}", ("calculator",), "hard")  # fmt: skip
        assert steps["s2"].agent == ""

        done = await submit(infra, "acme", "ap-flow", "add", workflow="adder")
        assert isinstance(done, TaskCompleted), done
        (node,) = (await plan_of(infra, "acme", "ap-flow")).steps
        assert node.agent == f"summer@{put['version']}" and node.tools == ("calculator",)
        # a workflow and a profile at once is refused, not one of them silently dropped
        both = await submit(infra, "acme", "ap-both", "add", workflow="adder", agent="summer")
        assert isinstance(both, TaskFailed) and "a workflow or an agent profile, not both" in both.reason, both

        # A plan naming a profile the tenant does not have fails with why, before any step runs.
        ghost = {"steps": [{**plan["steps"][0], "agent": "ghost"}]}
        failed = await submit(infra, "acme", "ap-ghost", "PLAN: " + json.dumps(ghost))
        assert isinstance(failed, TaskFailed) and "no agent profile 'ghost'" in failed.reason, failed
        assert await infra.stored("STEP", "step.v1.acme.ap-ghost.>") == []

    asyncio.run(main())


def test_changes_are_an_authors_right_on_the_chain_and_another_tenant_sees_nothing(infra, mesh, authors, capsys):
    put = add(infra, capsys, "clerk", "--description", "Files things.")
    assert put["rc"] == 0, put
    # bob authors globex: acme's profiles are not his to change, nor to see or run
    assert (
        add(
            infra,
            capsys,
            "clerk",
            "--description",
            "Hijacked.",
            author="author.globex.bob",
        )["rc"]
        == 0
    )
    assert {p["agent"] for p in listed(infra, capsys, "globex")} == {"clerk"}
    assert listed(infra, capsys, "globex")[0]["profile"]["description"] == "Hijacked."
    acme = {p["agent"]: p for p in listed(infra, capsys, "acme")}
    assert acme["clerk"]["profile"]["description"] == "Files things.", "globex's put made globex's own profile"

    failed = asyncio.run(submit(infra, "globex", "ap-foreign", "#say: hi", agent="calc"))
    assert isinstance(failed, TaskFailed) and "tenant globex has no agent profile 'calc'" in failed.reason

    assert ctl(infra, "agent", "remove", "clerk", "--as", ALICE, "--reason", "retired") == 0
    assert "clerk" not in {p["agent"] for p in listed(infra, capsys, "acme")}
    gone = asyncio.run(submit(infra, "acme", "ap-removed", "#say: hi", agent="clerk"))
    assert isinstance(gone, TaskFailed) and "no agent profile 'clerk'" in gone.reason

    links = asyncio.run(infra.audit_chain("acme"))
    kinds = [(link["kind"], link.get("detail", {}).get("name")) for link in links]
    assert ("agent.put", "clerk") in kinds and ("agent.remove", "clerk") in kinds, kinds
    put_link = next(x for x in links if x["kind"] == "agent.put" and x["detail"]["name"] == "clerk")
    assert put_link["actor"] == ALICE and put_link["detail"]["version"] == put["version"]
    # the show command prints every change, newest last
    capsys.readouterr()
    assert ctl(infra, "agent", "show", "clerk", "--tenant", "acme", "--version", put["version"]) == 0
    history = capsys.readouterr().out.split("history:")[1]
    assert history.index("put") < history.index("remove") and "retired" in history


def test_a_bad_profile_is_one_line_and_changes_nothing(infra, mesh, authors, capsys):
    with pytest.raises(SystemExit) as usage:
        ctl(infra, "agent", "add", "Bad Name", "--description", "x", "--as", ALICE)
    assert usage.value.code == 2
    assert ctl(infra, "agent", "add", "nodesc", "--as", ALICE) == 2
    assert ctl(infra, "agent", "add", "toomany", "--description", "x", "--max-iterations", "99", "--as", ALICE) == 2
    err = capsys.readouterr().err
    assert (
        "invalid agent name 'Bad Name'" in err
        and "--description" in err
        and "max_iterations" in err
        and "Traceback" not in err
    )
    assert not {"nodesc", "toomany"} & {p["agent"] for p in listed(infra, capsys, "acme")}


def signer(msg: Any) -> str:
    """The principal whose key signed a stored message (its identity token's ``iss``)."""
    claims = msg.headers["Mesh-Identity"].split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["iss"])


async def pending(infra: Infra, durable: str) -> int:
    nc = await infra.admin()
    try:
        return int((await nc.jetstream().consumer_info("STEP", durable)).num_pending)
    finally:
        await nc.close()


def test_a_pooled_profile_runs_only_on_its_pools_workers_and_waits_for_them(infra, mesh, authors, capsys):
    # added while the mesh runs: its identity is published to every service, its durables made
    assert ctl(infra, "pool", "add", "heavy") == 0
    capsys.readouterr()
    assert ctl(infra, "pool", "list", "--json") == 0
    assert {r["durable"] for r in json.loads(capsys.readouterr().out)} >= {"worker-heavy--step-requested"}
    put = add(infra, capsys, "cruncher", "--description", "Heavy arithmetic on its own workers.",
              "--tool", "calculator", "--pool", "heavy")  # fmt: skip
    assert put["rc"] == 0, put

    async def main() -> None:
        # No worker of the pool runs yet: the step waits on the pool's own durable, untouched by
        # the shared workers (their durable's filter has five tokens, the pool's step six).
        shared_before = await pending(infra, "worker--step-requested")
        async with TenantClient.of(infra.ids, infra.nats_url, "acme") as client:
            await client.submit(CALC, task_id="ap-pool", policy=NO_JUDGE, agent="cruncher", follow=False)
        for _ in range(300):
            if await pending(infra, "worker-heavy--step-requested") == 1:
                break
            await asyncio.sleep(0.1)
        (step,) = await infra.stored("STEP", "step.v1.acme.ap-pool.requested.>")
        assert step.subject == "step.v1.acme.ap-pool.requested.heavy"
        assert await pending(infra, "worker-heavy--step-requested") == 1
        assert await pending(infra, "worker--step-requested") == shared_before == 0
        assert await infra.stored("STEP", "step.v1.acme.ap-pool.completed") == []

        await mesh.add_pool_worker("heavy", "worker-heavy-0")
        for _ in range(600):  # the pool's worker takes the step that waited for it
            done = await infra.stored("TASK", "task.v1.acme.ap-pool.completed")
            if done:
                break
            await asyncio.sleep(0.1)
        assert done and "391" in TaskCompleted.parse(done[0].data).answer
        # the pool's identity made its tool call and finished it; the shared step of another
        # task running beside it is the shared workers'
        shared = await submit(infra, "acme", "ap-shared", CALC, agent="calc")
        assert isinstance(shared, TaskCompleted), shared
        for task, who in (("ap-pool", "worker-heavy"), ("ap-shared", "worker")):
            for stream, subject in (
                ("STEP", f"step.v1.acme.{task}.completed"),
                ("TOOL", f"tool.v1.acme.{task}.requested"),
            ):
                signers = {signer(m) for m in await infra.stored(stream, subject)}
                assert signers == {who}, (task, subject, signers)

    asyncio.run(main())


def test_a_profiles_documents_scope_its_retrieval(infra, mesh, authors, capsys):
    put = add(infra, capsys, "finance", "--description", "Answers from the finance documents only.",
              "--tool", "search_docs", "--documents", "finance-")  # fmt: skip
    assert put["rc"] == 0, put

    async def main() -> None:
        async with infra.client("acme") as client:
            for doc_id, text in (("finance-q3.md", "Quarterly refunds: 412 refunds were paid in the third quarter."),
                                 ("hr-leave.md", "Quarterly refunds of leave: unused leave days are refunded.")):  # fmt: skip
                done = await client.ingest(doc_id, text.encode(), "text/markdown")
                assert done is not None and done.ok, done
        goal = "How many quarterly refunds were paid?"
        scoped = await submit(infra, "acme", "ap-docs", goal, agent="finance")
        assert isinstance(scoped, TaskCompleted | TaskFailed), scoped
        asked = await infra.stored("RAG", "rag.v1.acme.ap-docs.requested")
        assert asked and all(json.loads(m.data)["scope"] == ["finance-"] for m in asked)
        found = await infra.stored("RAG", "rag.v1.acme.ap-docs.completed")
        hits = {h["doc_id"] for m in found for h in open_body(m.subject, m.data)["hits"]}
        assert hits == {"finance-q3.md"}, hits  # the hr document matches the query as well: out of scope
        # the same goal, planned by the worker's own step: both documents are there to find
        open_goal = "PLAN: " + json.dumps({"steps": [{"step_id": "s1", "kind": "answer", "instruction": goal,
                                                       "tools": ["search_docs"], "depends_on": []}]})  # fmt: skip
        await submit(infra, "acme", "ap-nodocs", open_goal)
        found = await infra.stored("RAG", "rag.v1.acme.ap-nodocs.completed")
        assert {h["doc_id"] for m in found for h in open_body(m.subject, m.data)["hits"]} >= {
            "finance-q3.md",
            "hr-leave.md",
        }

    asyncio.run(main())
