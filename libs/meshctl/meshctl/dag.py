"""A task's plan as a graph with each node's state, from what the streams hold about the task
(``meshctl.history``): what the dashboard draws, live (issue 40, item 5).

Nodes are the plan's steps (a workflow's nodes), edges their ``depends_on``; a node's state is
the last thing the streams say of it: ``pending``, ``running`` (dispatched; its ``attempt``),
``waiting`` (a timer or a signal), ``retrying`` (a failed try waiting its backoff),
``completed``, ``skipped`` (a branch not taken), ``failed`` or ``halted``. A task still under
review shows its waiting draft, every node ``draft``. Each node's ``depth`` is the longest path
to it from a node that runs after nothing: the column it is drawn in.
"""

from __future__ import annotations

from typing import Any

from meshctl.history import Entry, History

WAIT_STATE = {"timer": "waiting", "signal": "waiting", "retry": "retrying"}


def _label(step: dict[str, Any]) -> str:
    call = step.get("call") or {}
    if call.get("tool"):
        return f"{'retrieve' if call['tool'] == 'search_docs' else 'tool ' + call['tool']}"
    text = " ".join(str(step.get("instruction", "")).split())
    return text if len(text) <= 48 else text[:47] + "…"


def task_dag(h: History) -> dict[str, Any] | None:
    """The graph of the task's plan with each node's state, or None when it has no plan yet."""
    entries = sorted(h.entries, key=lambda e: (e.time, e.stream, e.seq))
    plan: Entry | None = None
    draft: Entry | None = None
    for e in entries:
        if e.type == "plan.created":
            plan = e
        elif e.type == "plan.drafted":
            draft = e
    source = plan or draft
    if source is None:
        return None
    steps = source.body.get("steps") or []
    state = {s["step_id"]: ("pending" if plan is not None else "draft") for s in steps}
    attempt = dict.fromkeys(state, 0)
    if plan is not None:
        for e in entries:
            if e.time < plan.time:
                continue
            b = e.body
            sid = str(b.get("step_id") or (b.get("step") or {}).get("step_id") or b.get("node") or "")
            if sid not in state:
                continue
            if e.type in ("step.requested", "check.requested"):  # (a check node's: the checker runs it)
                state[sid], attempt[sid] = "running", int(b.get("attempt", 1))
            elif e.type == "check.verdict":
                state[sid] = "completed" if b.get("passed") else "failed"
            elif e.type == "step.completed":
                state[sid] = "completed"
            elif e.type == "step.failed":
                state[sid] = "halted" if b.get("halted") else "failed"
            elif e.type == "wait.started":
                state[sid] = WAIT_STATE.get(str(b.get("kind")), "waiting")
            elif e.type == "wait.ended" and b.get("outcome") in ("timed_out", "denied"):
                state[sid] = "failed"  # (a denial the workflow goes on from completes the node next)
            elif e.type == "event.progress" and b.get("source") == "planner":
                stage = b.get("stage")
                if stage == "step.skipped":
                    state[sid] = "skipped"
                elif stage == "step.completed":
                    state[sid] = "completed"
    depth: dict[str, int] = {}
    for s in steps:  # steps come in dependency order
        depth[s["step_id"]] = 1 + max((depth.get(d, 0) for d in s.get("depends_on") or ()), default=-1)
    return {
        "workflow": str(source.body.get("workflow") or ""),
        "reviewed": str(source.body.get("reviewed") or ""),
        "draft": plan is None,
        "nodes": [
            {
                "id": s["step_id"],
                "label": _label(s),
                "state": state[s["step_id"]],
                "attempt": attempt[s["step_id"]],
                "depth": depth[s["step_id"]],
            }
            for s in steps
        ],
        "edges": [[d, s["step_id"]] for s in steps for d in s.get("depends_on") or () if d in state],
    }
