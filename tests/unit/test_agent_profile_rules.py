"""Agent profiles (issue 48), the parts with no mesh: what a profile may say, how a version is
named, how a plan's step is fitted to a profile (pinned, narrowed, tiered), how the worker runs a
step as one, and that adding ``agent`` to workflow nodes left every existing workflow's version
as it was."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mesh_agent.prompts import Prompt
from mesh_contracts.v1 import PlanStep, StepRequested
from mesh_contracts.v1.agents import AgentProfile, AgentVersion, parse_agent_ref
from mesh_contracts.v1.workflow import WorkflowDefinition
from mesh_planner import agents as ag
from mesh_worker.profiles import ProfileMissing, Profiles, applied, with_profile

ANALYST = AgentProfile(name="sql-analyst", description="Answers with read-only SQL.", instructions="One SELECT.",
                       tier="hard", tools=("sql_query", "search_docs"), max_iterations=4)  # fmt: skip


def test_a_profile_refuses_what_would_be_unsafe_or_ambiguous():
    for bad in (
        {"name": "Bad Name", "description": "x"},
        {"name": "ok", "description": ""},
        {"name": "ok", "description": "x", "tools": ["a", "a"]},
        {"name": "ok", "description": "x", "tools": ["a b"]},
        {"name": "ok", "description": "x", "max_iterations": 51},
        {"name": "ok", "description": "x", "pool": "Has.Dots"},
        {"name": "ok", "description": "x", "secret": "unknown fields are refused"},
    ):
        with pytest.raises(ValidationError):
            AgentProfile.model_validate(bad)


def test_a_version_is_the_digest_of_everything_the_profile_says():
    same = AgentProfile.model_validate(json.loads(ANALYST.model_dump_json()))
    assert same.digest() == ANALYST.digest() and len(ANALYST.digest()) == 16
    for change in ({"instructions": "Two SELECTs."}, {"tools": ("sql_query",)}, {"tier": ""}, {"exposed": True}):
        assert ANALYST.model_copy(update=change).digest() != ANALYST.digest(), change
    assert parse_agent_ref("sql-analyst") == ("sql-analyst", "")
    assert parse_agent_ref(f"sql-analyst@{ANALYST.digest()}") == ("sql-analyst", ANALYST.digest())
    for bad in ("SQL", "a@latest", "a@123", "@abc"):
        with pytest.raises(ValueError):
            parse_agent_ref(bad)


def version(p: AgentProfile = ANALYST) -> AgentVersion:
    return AgentVersion(tenant="acme", agent=p.name, version=p.digest(), profile=p)


def test_a_step_is_pinned_narrowed_to_the_profiles_tools_and_put_on_its_tier():
    step = PlanStep(step_id="s1", instruction="count refunds", tools=("sql_query", "http_get"), difficulty="easy")
    fitted = ag.fitted(step, version())
    assert fitted.agent == f"sql-analyst@{ANALYST.digest()}"
    assert fitted.tools == ("sql_query",), "a tool the profile does not allow is not offered"
    assert fitted.difficulty == "hard"
    bare = ag.fitted(PlanStep(step_id="s2", instruction="x"), version())
    assert bare.tools == ANALYST.tools, "a step that named no tools gets the profile's"
    untiered = ag.fitted(step, version(ANALYST.model_copy(update={"tier": ""})))
    assert untiered.difficulty == "easy"


def test_the_models_plan_names_profiles_by_name_and_the_schema_offers_only_the_tenants():
    text = json.dumps({"steps": [
        {"step_id": "s1", "kind": "research", "instruction": "a", "tools": [], "depends_on": [], "agent": "sql-analyst"},
        {"step_id": "s2", "kind": "answer", "instruction": "b", "tools": [], "depends_on": ["s1"], "agent": ""},
    ]})  # fmt: skip
    content, named = ag.take_agents(text)
    assert named == {"s1": "sql-analyst"}
    assert all("agent" not in s for s in json.loads(content)["steps"])
    assert ag.take_agents("not json") == ("not json", {})
    from mesh_planner.drafts import plan_schema

    schema = ag.with_agents(plan_schema(None, 2), ["sql-analyst"])
    step = schema["properties"]["steps"]["anyOf"][0]["prefixItems"][0]
    assert step["properties"]["agent"] == {"enum": ["", "sql-analyst"]} and "agent" not in step["required"]
    assert ag.with_agents(plan_schema(None, 2), []) == plan_schema(None, 2)


def test_the_worker_runs_the_step_with_the_profiles_instructions_tools_and_cap():
    step = PlanStep(
        step_id="s1", instruction="x", tools=("sql_query", "http_get"), agent=f"sql-analyst@{ANALYST.digest()}"
    )
    m = StepRequested(tenant="acme", task_id="t-1", step=step, max_iterations=10)
    run = applied(m, ANALYST)
    assert run.step.tools == ("sql_query",) and run.max_iterations == 4 and run.step.difficulty == "hard"
    system = with_profile(Prompt("worker.system", "3", "You are a worker.", "test"), ANALYST, step.agent)
    assert system.text.startswith("You are a worker.") and "One SELECT." in system.text
    assert f"sql-analyst-{ANALYST.digest()}" in system.ref


async def test_a_profile_version_the_registry_lacks_is_named_not_guessed():
    class KV:
        async def get(self, key: str):  # what nats-py raises for a missing key
            from nats.js.errors import KeyNotFoundError

            raise KeyNotFoundError

    with pytest.raises(ProfileMissing, match="sql-analyst@0000000000000000 of tenant acme"):
        await Profiles(KV()).get("acme", "sql-analyst@0000000000000000")
    assert await Profiles(KV()).get("acme", "") is None


def test_workflows_published_before_agent_nodes_keep_their_version():
    wf = WorkflowDefinition.model_validate(
        {"name": "w", "nodes": [{"id": "a", "kind": "agent", "instruction": "do it"}]}
    )
    raw = json.loads(wf.canonical())
    assert "agent" not in raw["nodes"][0], "an empty agent is not part of the digest"
    named = WorkflowDefinition.model_validate(
        {"name": "w", "nodes": [{"id": "a", "kind": "agent", "instruction": "do it", "agent": "sql-analyst"}]}
    )
    assert named.digest() != wf.digest() and ag.workflow_agents(named) == {"a": "sql-analyst"}
