"""The scripted model is deterministic; the planner's pure decisions (plan checks, dispatch, cascade)."""

from __future__ import annotations

import json

import pytest

from mesh_contracts.v1 import PlanStep
from mesh_contracts.v1.records import StepState, TaskRecord
from mesh_llm import Message, ModelRequest, ScriptedModel
from mesh_planner.drafts import parse_plan
from mesh_planner.flow import dependents
from mesh_planner.steps import dispatch_ready

pytestmark = pytest.mark.unit
GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."


async def test_scripted_planner_is_deterministic_and_plans_a_dag():
    req = ModelRequest((Message("user", GOAL),), agent="planner")
    a, b = await ScriptedModel().complete(req), await ScriptedModel().complete(req)
    assert a == b
    steps = parse_plan(a.content, max_steps=8)
    assert [s.step_id for s in steps] == ["s1", "s2", "s3"]
    assert steps[1].tools == ("calculator",) and "17 * 23" in steps[1].instruction
    assert steps[2].depends_on == ("s1", "s2")


@pytest.mark.parametrize(
    ("plan", "error"),
    [
        ("not json", "unusable plan"),
        (json.dumps({"steps": []}), "no steps"),
        (
            json.dumps(
                {
                    "steps": [
                        {"step_id": "a", "instruction": "x", "depends_on": ["b"]},
                        {"step_id": "b", "instruction": "y"},
                    ]
                }
            ),
            "not earlier steps",
        ),
        (json.dumps({"steps": [{"step_id": f"s{i}", "instruction": "x"} for i in range(9)]}), "over the task's limit"),
    ],
)
def test_bad_plans_are_refused_with_a_reason(plan, error):
    with pytest.raises(ValueError, match=error):
        parse_plan(plan, max_steps=8)


def _record():
    steps = [
        PlanStep(step_id="s1", instruction="a"),
        PlanStep(step_id="s2", instruction="b"),
        PlanStep(step_id="s3", instruction="c", depends_on=("s1", "s2")),
    ]
    return TaskRecord(
        tenant="acme", task_id="t", goal="g", status="running", steps={s.step_id: StepState(step=s) for s in steps}
    )


def test_dispatch_only_steps_whose_dependencies_completed():
    rec = _record()
    dispatch_ready(rec)
    assert [i.key for i in rec.outbox if i.type == "step.requested"] == ["s1:1", "s2:1"]
    rec.outbox.clear()
    rec.steps["s1"].status = "completed"
    rec.steps["s1"].output = "one"
    dispatch_ready(rec)
    assert not [i for i in rec.outbox if i.type == "step.requested"], "s3 still waits for s2"
    rec.steps["s2"].status, rec.steps["s2"].output = "completed", "two"
    dispatch_ready(rec)
    req = next(i for i in rec.outbox if i.type == "step.requested")
    assert req.key == "s3:1" and req.body["inputs"] == {"s1": "one", "s2": "two"}


def test_failure_cascades_to_every_transitive_dependent():
    rec = _record()
    rec.steps["s4"] = StepState(step=PlanStep(step_id="s4", instruction="d", depends_on=("s3",)))
    assert dependents(rec, "s1") == ["s3", "s4"]
    assert dependents(rec, "s3") == ["s4"]
