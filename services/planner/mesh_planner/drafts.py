"""Plans as the planner's model writes them and people edit them: parsed and checked against the
step limits, drafted into the task record for review, and compared (what an edit changed)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from mesh_contracts.v1 import (
    PlanDrafted,
    PlanStep,
)
from mesh_contracts.v1.records import (
    TaskRecord,
    ToolCatalogue,
)
from mesh_contracts.v1.task import draft_hash
from mesh_contracts.v1.workflow import (
    WorkflowDefinition,
)
from mesh_planner.outbox import event, out
from mesh_planner.steps import RETRIEVAL


def tool_list(catalogue: ToolCatalogue | None) -> str:
    """The tools a plan may name, as the planning prompt lists them (``{tools}``): retrieval (the
    worker serves it, through rag) and every tool of the tool-executor's catalogue, each with the
    first sentence of its description."""
    listed = [f"{RETRIEVAL} (retrieval over the tenant's documents)"]
    for t in catalogue.tools if catalogue is not None else []:
        first = t.description.split(". ")[0].rstrip(".")
        listed.append(f"{t.name} ({first[:100]})" if first else t.name)
    return ", ".join(listed)


SCHEMA_MAX_STEPS = 8
"""The longest plan ``plan_schema`` spells out (its grammar grows with the square of it)."""


def plan_schema(catalogue: ToolCatalogue | None, max_steps: int) -> dict[str, Any]:
    """The JSON Schema of the plans this task may have, for a model that can be held to one (its
    output constrained to the schema, as llama.cpp does with a grammar): a plan of 1 to
    ``max_steps`` steps (at most ``SCHEMA_MAX_STEPS``), step ``i`` with the id ``s<i>``, depending
    only on earlier steps, and naming only tools there are. Any plan that matches it passes
    ``checked_plan``, so even a very small local model writes a plan the planner can run."""
    tools = [RETRIEVAL, *(t.name for t in catalogue.tools)] if catalogue is not None else [RETRIEVAL]

    def step(i: int) -> dict[str, Any]:
        earlier = [f"s{j}" for j in range(1, i)]
        after = {"type": "array", "items": {"enum": earlier}, "maxItems": len(earlier)} if earlier else {"const": []}
        return {
            "type": "object",
            "properties": {
                "step_id": {"const": f"s{i}"},
                "kind": {"enum": ["research", "compute", "write", "answer"]},
                "instruction": {"type": "string", "minLength": 1},
                "tools": {"type": "array", "items": {"enum": tools}, "maxItems": 3},
                "depends_on": after,
            },
            "required": ["step_id", "kind", "instruction", "tools", "depends_on"],
            "additionalProperties": False,
        }

    longest = max(1, min(max_steps, SCHEMA_MAX_STEPS))
    plans = [
        {"type": "array", "prefixItems": [step(i) for i in range(1, n + 1)], "minItems": n, "maxItems": n}
        for n in range(1, longest + 1)
    ]
    return {
        "type": "object",
        "properties": {"steps": {"anyOf": plans}},
        "required": ["steps"],
        "additionalProperties": False,
    }


def plan_max_tokens(max_steps: int) -> int:
    return min(1024, 128 + 96 * max_steps)


def parse_plan(text: str, max_steps: int) -> list[PlanStep]:
    try:
        raw = json.loads(text)["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"planner model returned an unusable plan: {str(exc)[:200]}") from None
    try:
        return checked_plan(raw, max_steps)
    except ValidationError as exc:
        raise ValueError(f"planner model returned an unusable plan: {str(exc)[:200]}") from None


def checked_plan(raw: Any, max_steps: int) -> list[PlanStep]:
    """Steps as a plan must have them (the model's, or a reviewer's edit): unique ids, each after
    the steps it depends on, at most ``max_steps``; ValueError (ValidationError: a bad step) if not."""
    if not isinstance(raw, list):
        raise ValueError("a plan is a list of steps")
    steps = [PlanStep.model_validate(s) for s in raw]
    ids = [s.step_id for s in steps]
    if not steps or len(set(ids)) != len(ids):
        raise ValueError("plan has no steps or repeats a step id")
    if len(steps) > max_steps:
        raise ValueError(f"plan has {len(steps)} steps, over the task's limit of {max_steps}")
    for s in steps:
        unknown = [d for d in s.depends_on if d not in ids or ids.index(d) >= ids.index(s.step_id)]
        if unknown:
            raise ValueError(f"step {s.step_id} depends on {unknown}, which are not earlier steps")
    return steps


def workflow_edit_problem(wf: WorkflowDefinition, old: list[PlanStep], new: list[PlanStep]) -> str | None:
    """Why ``new`` is not an edit a workflow's draft may take (None: it is): the same nodes, in
    the same order, with the same kinds, tools, calls and edges; only what an agent node is told
    (its instruction) may change. The workflow is the contract the reviewer approves."""
    if [s.step_id for s in old] != [s.step_id for s in new]:
        return f"its nodes are {', '.join(s.step_id for s in old)}; an edit may not add, remove or reorder nodes"
    for a, b in zip(old, new, strict=True):
        for field in ("kind", "tools", "depends_on", "difficulty", "output_schema", "call", "agent", "pool"):
            if getattr(a, field) != getattr(b, field):
                verb = "are" if field.endswith("s") else "is"
                return (
                    f"node {a.step_id}: {field} {verb} fixed by the workflow; an edit may change only what it is told"
                )
        if a.instruction != b.instruction and wf.node(a.step_id).kind != "agent":
            return f"node {a.step_id} is not an agent node: its instruction is the workflow's"
    return None


def draft(rec: TaskRecord, steps: list[PlanStep], *, causation: str, editor: str = "") -> None:
    """Make ``steps`` the task's draft plan, waiting for a reviewer (the task stays ``planning``)."""
    before = list(rec.draft)
    rec.draft, rec.draft_hash = steps, draft_hash(steps)
    rec.draft_revision += 1
    changes = plan_changes(before, steps) if editor else []
    out(
        rec,
        PlanDrafted(tenant=rec.tenant, task_id=rec.task_id, steps=tuple(steps), draft=rec.draft_hash,
                    revision=rec.draft_revision, edited_by=editor, changes=tuple(changes), workflow=rec.workflow),
        key=f"draft:{rec.draft_hash}", causation=causation,
    )  # fmt: skip
    by = f"edited by {editor} ({len(changes)} change(s)); " if editor else ""
    event(rec, "plan.review", f"draft {rec.draft_hash} ({len(steps)} steps) {by}waits for a reviewer: meshctl review "
           f"approve {rec.task_id} --tenant {rec.tenant} --as <approver>", key=rec.draft_hash)  # fmt: skip


def plan_changes(old: list[PlanStep], new: list[PlanStep]) -> list[str]:
    """What an edit changed, step by step: ``+ s3``, ``- s2``, ``~ s1.instruction: "a" -> "b"``."""
    a, b = {s.step_id: s.model_dump(mode="json") for s in old}, {s.step_id: s.model_dump(mode="json") for s in new}
    lines = [f"- {i}" for i in a if i not in b] + [f"+ {i}: {b[i]['instruction'][:80]}" for i in b if i not in a]
    for i in (i for i in b if i in a and a[i] != b[i]):
        lines += [f"~ {i}.{k}: {json.dumps(a[i].get(k))[:80]} -> {json.dumps(b[i].get(k))[:80]}"
                  for k in sorted(set(a[i]) | set(b[i])) if a[i].get(k) != b[i].get(k)]  # fmt: skip
    if not lines and [s.step_id for s in old] != [s.step_id for s in new]:
        lines.append("~ order: " + ", ".join(s.step_id for s in new))
    return lines
