"""The task graph the dashboard draws (``meshctl.dag``), from a task's stored messages: each
node's state is the last thing the streams say of it. In a browser: tests/browser/check_dashboard.py."""

from __future__ import annotations

from typing import Any

import pytest

from meshctl.dag import task_dag
from meshctl.history import Entry, History

pytestmark = pytest.mark.unit

STEPS = [
    {"step_id": "fetch", "instruction": "call http_get", "call": {"tool": "http_get", "arguments": {}}},
    {"step_id": "high", "instruction": "Escalate it", "depends_on": ["fetch"]},
    {"step_id": "low", "instruction": "Close it", "depends_on": ["fetch"]},
    {"step_id": "cool", "instruction": "wait 5 s", "depends_on": ["high", "low"]},
    {"step_id": "reply", "instruction": "Reply to the customer about the ticket they opened last week",
     "depends_on": ["cool"]},
]  # fmt: skip


def history(*messages: tuple[str, dict[str, Any]]) -> History:
    entries = [Entry("TASK", i, 100.0 + i, "s", kind, "planner", f"m{i}", "", "", body)
               for i, (kind, body) in enumerate(messages)]  # fmt: skip
    return History("acme", "t", entries)


def test_each_node_shows_the_last_thing_the_streams_say_of_it():
    h = history(
        ("plan.drafted", {"steps": STEPS, "workflow": "triage@0123456789abcdef"}),
        ("plan.created", {"steps": STEPS, "workflow": "triage@0123456789abcdef", "reviewed": "d by dana"}),
        ("step.requested", {"step": {"step_id": "fetch"}, "attempt": 1}),
        ("step.failed", {"step_id": "fetch", "attempt": 1}),
        ("wait.started", {"step_id": "fetch", "kind": "retry"}),
        ("step.requested", {"step": {"step_id": "fetch"}, "attempt": 2}),
        ("step.completed", {"step_id": "fetch", "attempt": 2}),
        ("event.progress", {"source": "planner", "stage": "step.skipped", "step_id": "low"}),
        ("step.requested", {"step": {"step_id": "high"}, "attempt": 1}),
        ("step.completed", {"step_id": "high", "attempt": 1}),
        ("wait.started", {"step_id": "cool", "kind": "timer"}),
    )
    dag = task_dag(h)
    assert dag is not None and dag["workflow"] == "triage@0123456789abcdef" and not dag["draft"]
    nodes = {n["id"]: n for n in dag["nodes"]}
    assert {k: n["state"] for k, n in nodes.items()} == {
        "fetch": "completed", "high": "completed", "low": "skipped", "cool": "waiting", "reply": "pending"}  # fmt: skip
    assert nodes["fetch"]["attempt"] == 2 and nodes["fetch"]["label"] == "tool http_get"
    assert [nodes[k]["depth"] for k in ("fetch", "high", "low", "cool", "reply")] == [0, 1, 1, 2, 3]
    assert len(nodes["reply"]["label"]) <= 48
    assert dag["edges"] == [["fetch", "high"], ["fetch", "low"], ["high", "cool"], ["low", "cool"], ["cool", "reply"]]


def test_a_draft_is_drawn_as_a_draft_and_a_task_without_a_plan_as_nothing():
    dag = task_dag(history(("plan.drafted", {"steps": STEPS})))
    assert dag is not None and dag["draft"] and {n["state"] for n in dag["nodes"]} == {"draft"}
    assert task_dag(history(("task.submitted", {"goal": "g"}))) is None


def test_a_retry_backoff_and_a_timed_out_wait_are_drawn_as_such():
    dag = task_dag(history(
        ("plan.created", {"steps": STEPS}),
        ("step.requested", {"step": {"step_id": "fetch"}, "attempt": 1}),
        ("step.failed", {"step_id": "fetch", "attempt": 1}),
        ("wait.started", {"step_id": "fetch", "kind": "retry"}),
        ("wait.started", {"step_id": "cool", "kind": "signal"}),
        ("wait.ended", {"step_id": "cool", "outcome": "timed_out"}),
        ("wait.started", {"step_id": "high", "kind": "approval"}),
        ("wait.ended", {"step_id": "high", "outcome": "denied"}),
        ("wait.started", {"step_id": "low", "kind": "approval"}),
        ("wait.ended", {"step_id": "low", "outcome": "denied"}),
        ("event.progress", {"source": "planner", "stage": "step.completed", "step_id": "low"}),  # on_denied: continue
    ))  # fmt: skip
    assert dag is not None
    states = {n["id"]: n["state"] for n in dag["nodes"]}
    assert states["fetch"] == "retrying" and states["cool"] == "failed"
    assert states["high"] == "failed" and states["low"] == "completed"


def test_a_check_node_is_running_while_the_checker_works_and_shows_its_verdict():
    steps = [{"step_id": "draft", "instruction": "Draft"}, {"step_id": "gate", "instruction": "check draft: no_pii",
                                                             "depends_on": ["draft"]}]  # fmt: skip
    plan = ("plan.created", {"steps": steps})
    asked = ("check.requested", {"node": "gate", "attempt": 2, "answer_step": "draft"})
    dag = task_dag(history(plan, asked))
    assert dag is not None and {n["id"]: (n["state"], n["attempt"]) for n in dag["nodes"]}["gate"] == ("running", 2)
    failed = task_dag(history(plan, asked, ("check.verdict", {"node": "gate", "attempt": 2, "passed": False})))
    assert failed is not None and {n["id"]: n["state"] for n in failed["nodes"]}["gate"] == "failed"
    # The task's own check (no node) is nobody's node.
    own = task_dag(history(plan, ("check.requested", {"attempt": 1, "answer_step": "draft"})))
    assert own is not None and {n["state"] for n in own["nodes"]} == {"pending"}
