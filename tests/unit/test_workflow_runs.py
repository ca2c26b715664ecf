"""The workflow registry and a fixed workflow's run, in memory (``mesh_planner.workflows``,
``mesh_planner.steps.dispatch_workflow``, ``mesh_contracts.v1.workflow_runs.render``). The same
through the real mesh: tests/scenarios/test_workflow_registry.py."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_contracts.v1.records import StepState, TaskRecord
from mesh_contracts.v1.workflow import WorkflowDefinition
from mesh_contracts.v1.workflow_runs import render
from mesh_contracts.v1.workflow_versions import WorkflowChange
from mesh_identity import Principal, TrustBundle, new_signing_key
from mesh_planner.drafts import workflow_edit_problem
from mesh_planner.steps import dispatch_workflow, workflow_steps
from mesh_planner.workflows import Refused, Registry, may_change
from mesh_testing.memkv import MemoryKV

pytestmark = pytest.mark.unit


def definition(**over: Any) -> dict[str, Any]:
    return {
        "name": "triage",
        "inputs": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]},
        "nodes": [
            {"id": "classify", "kind": "agent", "instruction": "Classify {{inputs.topic}}"},
            {"id": "high", "kind": "agent", "instruction": "Escalate {{nodes.classify.output.topic}}",
             "after": [{"node": "classify", "when": {"path": "severity", "op": "eq", "value": "high"}}]},
            {"id": "low", "kind": "agent", "instruction": "Close it",
             "after": [{"node": "classify", "when": {"path": "severity", "op": "eq", "value": "low"}}]},
            {"id": "reply", "kind": "agent", "role": "answer", "instruction": "Reply", "after": ["high", "low"]},
        ],
        **over,
    }  # fmt: skip


def change(action: str, version: str = "", definition_: Any = None, task: str = "wf-1") -> WorkflowChange:
    return WorkflowChange(
        tenant="acme", task_id=task, action=action, name="triage", version=version,  # type: ignore[arg-type]
        definition=definition_, author="author.acme.alice",
    )  # fmt: skip


def test_templates_are_filled_once_from_inputs_and_outputs():
    outputs = {"a": '{"amount": 120, "who": {"name": "Ann"}}', "t": "plain text"}
    text = "{{inputs.x}}|{{ nodes.a.output.amount }}|{{nodes.a.output.who}}|{{nodes.t.output}}|{{nodes.z.output}}"
    assert render(text, {"x": "{{inputs.x}}"}, outputs) == '{{inputs.x}}|120|{"name": "Ann"}|plain text|'
    assert render("{{nodes.t.output.k}}", {}, outputs) == ""  # a path into text that is not JSON


def _record(wf: WorkflowDefinition) -> TaskRecord:
    rec = TaskRecord(tenant="acme", task_id="t", goal="g", workflow=wf.ref(), inputs={"topic": "billing"})
    rec.steps = {s.step_id: StepState(step=s) for s in workflow_steps(wf)}
    return rec


def _sent(rec: TaskRecord) -> list[tuple[str, str]]:
    return [
        (i.body["step"]["step_id"], i.body["step"]["instruction"]) for i in rec.outbox if i.type == "step.requested"
    ]


@pytest.mark.parametrize(("severity", "runs", "skips"), [("high", "high", "low"), ("low", "low", "high"),
                                                          ("none", None, "high low reply")])  # fmt: skip
def test_a_fixed_workflow_runs_the_branch_its_conditions_choose(severity, runs, skips):
    wf = WorkflowDefinition.model_validate(definition())
    rec = _record(wf)
    dispatch_workflow(rec, wf)
    assert _sent(rec) == [("classify", "Classify billing")]
    rec.steps["classify"].status = "completed"
    rec.steps["classify"].output = f'{{"severity": "{severity}", "topic": "billing"}}'
    rec.outbox = []
    dispatch_workflow(rec, wf)
    skipped = sorted(s for s, st in rec.steps.items() if st.skipped)
    assert skipped == sorted(skips.split()) and all(rec.steps[s].status == "completed" for s in skipped)
    if runs is None:  # nothing it needs ran: the join is skipped too
        assert _sent(rec) == []
        return
    assert [s for s, _ in _sent(rec)] == [runs]
    rec.steps[runs].status, rec.steps[runs].output, rec.outbox = "completed", "done", []
    dispatch_workflow(rec, wf)
    assert _sent(rec) == [("reply", "Reply")]
    request = next(i for i in rec.outbox if i.type == "step.requested").body
    assert set(request["inputs"]) == {runs}, "a skipped node is not an input"


def _bundle(*people: tuple[str, str, str]) -> TrustBundle:
    return TrustBundle(
        {n: Principal(n, role, tenant, new_signing_key().public_key()) for n, role, tenant in people}, revision=7
    )


def test_only_an_author_of_the_tenant_under_the_newest_bundle_may_change_it():
    alice = Principal("author.acme.alice", "author", "acme", new_signing_key().public_key())
    now = _bundle(("author.acme.alice", "author", "acme"))
    assert may_change(now, alice, "acme") is None
    assert may_change(now, alice, "globex") == "author.acme.alice authors workflows of tenant 'acme', not 'globex'"
    assert (
        may_change(_bundle(), alice, "acme")
        == "author.acme.alice is not an author of workflows (trust bundle revision 7)"
    )
    approver = _bundle(("author.acme.alice", "approver", "acme"))
    assert "is not an author" in (may_change(approver, alice, "acme") or "")


async def test_versions_are_immutable_and_latest_follows_their_status():
    reg = Registry(MemoryKV())
    first = await reg.apply(change("publish", definition_=definition()), "wf-1")
    v1 = first.version
    assert (first.changed, first.status, first.latest) == (True, "active", v1)
    assert v1 == WorkflowDefinition.model_validate(definition()).digest()
    again = await reg.apply(change("publish", definition_=definition(), task="wf-2"), "wf-2")
    assert (again.version, again.changed) == (v1, False)
    redelivered = await reg.apply(change("publish", definition_=definition()), "wf-1")  # the same change again
    assert redelivered.changed and (await reg.catalog("acme")).workflows["triage"][0].version == v1
    with pytest.raises(Refused, match="the author computed 0000000000000000"):
        await reg.apply(change("publish", "0" * 16, definition()), "wf-3")
    with pytest.raises(Refused, match=r"not a valid workflow: .*'b', which is not a node"):
        await reg.apply(change("publish", definition_=definition(nodes=[{"id": "a", "kind": "agent",
                                                                          "instruction": "x", "after": ["b"]}])), "wf-4")  # fmt: skip
    v2 = (await reg.apply(change("publish", definition_=definition(description="two"), task="wf-5"), "wf-5")).version
    assert (await reg.catalog("acme")).latest("triage") == v2
    assert (await reg.apply(change("deprecate", v2, task="wf-6"), "wf-6")).latest == v1
    with pytest.raises(Refused, match=f"triage@{v2} is deprecated by author.acme.alice"):
        await reg.resolve("acme", f"triage@{v2}", {"topic": "x"})
    assert (await reg.resolve("acme", "triage", {"topic": "x"})).ref == f"triage@{v1}"
    assert (await reg.apply(change("delete", v1, task="wf-7"), "wf-7")).latest == ""
    with pytest.raises(Refused, match="has no active version"):
        await reg.resolve("acme", "triage@latest", {"topic": "x"})
    with pytest.raises(Refused, match="it stays deleted"):
        await reg.apply(change("restore", v1, task="wf-8"), "wf-8")
    # a task that pinned v1 still reads its definition, deleted or not
    assert (await reg.pinned("acme", f"triage@{v1}")).digest() == v1
    rec = await reg.version("acme", "triage", v1)
    assert rec is not None and [e.action for e in rec.history] == ["publish", "delete"]


async def test_a_task_is_refused_what_does_not_resolve():
    reg = Registry(MemoryKV())
    v = (await reg.apply(change("publish", definition_=definition()), "wf-1")).version
    with pytest.raises(Refused, match="tenant globex has no workflow 'triage'"):
        await reg.resolve("globex", "triage", {"topic": "x"})
    with pytest.raises(Refused, match=r"inputs of triage@.*: inputs: 'topic' is a required property"):
        await reg.resolve("acme", "triage", {})
    with pytest.raises(Refused, match="topic: 3 is not of type 'string'"):
        await reg.resolve("acme", f"triage@{v}", {"topic": 3})
    with pytest.raises(Refused, match="expected NAME, NAME@latest"):
        await reg.resolve("acme", "triage@v2", {})
    with pytest.raises(Refused, match="has no workflow triage@ffffffffffffffff"):
        await reg.resolve("acme", "triage@ffffffffffffffff", {})


# --- plans under review -------------------------------------------------------------------


def test_an_edit_says_what_changed_step_by_step():
    from mesh_contracts.v1 import PlanStep
    from mesh_planner.drafts import plan_changes

    a = [PlanStep(step_id="s1", instruction="Find it", tools=("search_docs",)), PlanStep(step_id="s2", instruction="x")]
    b = [PlanStep(step_id="s1", instruction="Find it in the policy", tools=("search_docs",)),
         PlanStep(step_id="s3", instruction="Answer", kind="answer", depends_on=("s1",))]  # fmt: skip
    assert plan_changes(a, b) == [
        "- s2",
        "+ s3: Answer",
        '~ s1.instruction: "Find it" -> "Find it in the policy"',
    ]
    assert plan_changes(a, list(reversed(a))) == ["~ order: s2, s1"]
    assert plan_changes(a, a) == []


def test_an_edited_plan_is_held_to_the_rules_of_a_plan():
    from mesh_planner.drafts import checked_plan

    ok = checked_plan(
        [{"step_id": "a", "instruction": "x"}, {"step_id": "b", "instruction": "y", "depends_on": ["a"]}], 4
    )
    assert [s.step_id for s in ok] == ["a", "b"]
    with pytest.raises(ValueError, match=r"step a depends on \['b'\], which are not earlier steps"):
        checked_plan(
            [{"step_id": "a", "instruction": "x", "depends_on": ["b"]}, {"step_id": "b", "instruction": "y"}], 4
        )
    with pytest.raises(ValueError, match="over the task's limit of 1"):
        checked_plan([{"step_id": "a", "instruction": "x"}, {"step_id": "b", "instruction": "y"}], 1)
    with pytest.raises(ValueError, match="repeats a step id"):
        checked_plan([{"step_id": "a", "instruction": "x"}, {"step_id": "a", "instruction": "y"}], 4)


def test_who_may_decide_a_tenants_draft():
    named = _bundle(("approver", "approver", None), ("approver.acme.alice", "approver", "acme"),  # type: ignore[arg-type]
                    ("approver.globex.bob", "approver", "globex"), ("worker", "worker", None))  # type: ignore[arg-type]  # fmt: skip
    assert named.may_decide("approver.acme.alice", "acme") is None
    assert (
        named.may_decide("approver.globex.bob", "acme")
        == "approver.globex.bob may speak only for tenant 'globex', not 'acme'"
    )
    assert "names its own approvers (approver.acme.alice)" in (named.may_decide("approver", "acme") or "")
    assert named.may_decide("approver", "initech") is None  # no one named: the console decides
    assert named.may_decide("worker", "acme") == "worker is no longer an approver (trust bundle revision 7)"


def test_tool_and_retrieve_nodes_are_fixed_calls_filled_in_at_dispatch():
    wf = WorkflowDefinition.model_validate(
        {
            "name": "calls",
            "nodes": [
                {"id": "docs", "kind": "retrieve", "query": "policy on {{inputs.topic}}", "top_k": 2},
                {"id": "fetch", "kind": "tool", "tool": "http_get", "after": ["docs"],
                 "arguments": {"url": "https://x.test/{{nodes.docs.output.0.doc_id}}", "n": [1, "{{inputs.topic}}"]}},
            ],
        }
    )  # fmt: skip
    rec = TaskRecord(tenant="acme", task_id="t", goal="g", workflow=wf.ref(), inputs={"topic": "refunds"})
    rec.steps = {s.step_id: StepState(step=s) for s in workflow_steps(wf)}
    assert [(s.step.kind, s.step.tools) for s in rec.steps.values()] == [("research", ("search_docs",)),
                                                                          ("compute", ("http_get",))]  # fmt: skip
    dispatch_workflow(rec, wf)
    (first,) = [i.body["step"]["call"] for i in rec.outbox if i.type == "step.requested"]
    assert first == {"tool": "search_docs", "arguments": {"query": "policy on refunds", "top_k": 2}}
    rec.steps["docs"].status, rec.steps["docs"].output, rec.outbox = "completed", '[{"doc_id": "refunds.md"}]', []
    dispatch_workflow(rec, wf)
    (second,) = [i.body["step"]["call"] for i in rec.outbox if i.type == "step.requested"]
    assert second == {"tool": "http_get", "arguments": {"url": "https://x.test/refunds.md", "n": [1, "refunds"]}}


def test_a_workflows_draft_may_change_what_an_agent_node_is_told_and_nothing_else():
    wf = WorkflowDefinition.model_validate(definition(nodes=[
        {"id": "look", "kind": "tool", "tool": "http_get", "arguments": {"url": "{{inputs.topic}}"}},
        {"id": "say", "kind": "agent", "instruction": "Say {{nodes.look.output}}", "after": ["look"]},
        {"id": "cool", "kind": "timer", "after_s": 5, "after": ["say"]}]))  # fmt: skip
    steps = workflow_steps(wf)

    def edited(i: int, **change: Any) -> list[Any]:
        out = list(steps)
        out[i] = out[i].model_copy(update=change)
        return out

    assert workflow_edit_problem(wf, steps, edited(1, instruction="Say it kindly: {{nodes.look.output}}")) is None
    assert "tools are fixed by the workflow" in workflow_edit_problem(wf, steps, edited(1, tools=("send_email",)))
    assert "depends_on is fixed" in workflow_edit_problem(wf, steps, edited(1, depends_on=()))
    assert "not an agent node" in workflow_edit_problem(wf, steps, edited(0, instruction="call something else"))
    assert "not an agent node" in workflow_edit_problem(wf, steps, edited(2, instruction="wait 0 s"))
    assert "may not add, remove or reorder" in workflow_edit_problem(wf, steps, steps[:2])
    assert "may not add, remove or reorder" in workflow_edit_problem(wf, steps, [steps[1], steps[0], steps[2]])


def test_a_workflow_in_mode_auto_is_refused_saying_why():
    from mesh_contracts.v1.workflow_runs import not_runnable

    assert not_runnable(WorkflowDefinition.model_validate(definition(mode="auto")))[0].startswith("mode 'auto'")
    assert not_runnable(WorkflowDefinition.model_validate(definition(mode="review"))) == []
