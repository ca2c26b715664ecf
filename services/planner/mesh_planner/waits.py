"""What a workflow task waits for, in its record (issue 40): timers, signals, retries, timeouts.

Pure functions on a ``TaskRecord``: the planner calls them inside a transition (compare-and-set
on the record), and what they decide to say goes to the record's outbox, published once the
record is written. A wait with a time also puts a wake-up in the outbox (``WAKE``): the planner
asks the broker for it when it flushes (``mesh_planner.timers``), so the record holds every wait
before the broker is asked to end it, and a crash between the two is repaired by the next flush.

- A ``timer`` node waits ``after_s`` from when it is reached, or until ``until``.
- A ``signal`` node waits for ``task.signal`` of its name (one kept from before is taken at once),
  at most its ``timeout_s``.
- A node's try may take at most its ``timeout_s``: a try still running then has failed.
- A failed try of a node with ``retry.attempts`` left waits its backoff, then the node is
  dispatched again.

Waits for the world (timers, signals, retries) are told to everyone following the task
(``wait.started``, ``wait.ended``): the budget counts their time as neither a stall nor a
deadlock. A try's timeout is not a wait of the task's: its step is being worked on.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

import jsonschema

from mesh_contracts.v1.records import OutboxItem, SignalState, StepState, TaskRecord, WaitState
from mesh_contracts.v1.workflow import (
    ApprovalNode,
    SignalNode,
    TimerNode,
    WorkflowDefinition,
)
from mesh_contracts.v1.workflow_runs import WaitEnded, WaitStarted, render
from mesh_planner.outbox import WAKE, event, out

EARLY_S = 0.05
"""A wake-up this much before its wait is due is early (the broker's clock ahead of ours): it is
looked at again when due. Anything later fires."""


WORLD = ("timer", "signal", "retry", "approval")
"""Waits for the world: a task with only these open holds no run slot (``idle``)."""


def idle(rec: TaskRecord) -> bool:
    """Whether the task waits only for the world: a draft plan for its reviewer, or, running, a
    timer, a signal, an approval or a retry's backoff, with no step being worked on. It then holds
    no run slot (``mesh_planner.admission``)."""
    if rec.status == "planning":
        return bool(rec.draft_hash)
    if rec.status != "running":
        return False
    held = {w.step_id for w in rec.waits.values() if w.kind in WORLD}
    return bool(held) and not any(s.status == "dispatched" and sid not in held for sid, s in rec.steps.items())


def wait_id(kind: str, attempt: int, step_id: str) -> str:
    wid = f"{kind}-{attempt}-{step_id}"
    if len(wid) <= 64:
        return wid
    return f"{kind}-{attempt}-{hashlib.sha256(step_id.encode()).hexdigest()[:20]}"


def start(rec: TaskRecord, wid: str, w: WaitState, *, told: bool = True, request: str = "") -> None:
    """Record wait ``wid``; schedule its wake-up if it has a time; tell followers if ``told``."""
    w.started_at = w.started_at or time.time()
    rec.waits[wid] = w
    if w.due_at is not None:
        rec.outbox.append(OutboxItem(type=WAKE, key=wid, body={"due_at": w.due_at}))
    if told:
        assert w.kind != "timeout", "a try's timeout is the planner's own: no follower is told of it"
        out(rec, WaitStarted(tenant=rec.tenant, task_id=rec.task_id, wait_id=wid, step_id=w.step_id, kind=w.kind,
                              until=w.due_at, signal=w.signal, decision=w.decision, request=request[:4000]),
             key=f"{wid}:start")  # fmt: skip


def end(rec: TaskRecord, wid: str, outcome: str, now: float) -> WaitState | None:
    """Wait ``wid`` is over (``fired``, ``signalled``, ``timed_out``, ``abandoned``); None if it was not open."""
    w = rec.waits.pop(wid, None)
    if w is None:
        return None
    if w.kind != "timeout":
        late = round(now - w.due_at, 3) if w.due_at is not None and outcome in ("fired", "timed_out") else None
        out(rec, WaitEnded(tenant=rec.tenant, task_id=rec.task_id, wait_id=wid, step_id=w.step_id,
                            outcome=outcome, late_s=late), key=f"{wid}:end")  # type: ignore[arg-type]  # fmt: skip
    return w


def drop(rec: TaskRecord, step_id: str, kinds: tuple[str, ...] = ("timeout",)) -> None:
    """Close the step's waits of ``kinds`` (a try that ended before its timeout)."""
    for wid in [k for k, w in rec.waits.items() if w.step_id == step_id and w.kind in kinds]:
        end(rec, wid, "abandoned", time.time())


def abandon_all(rec: TaskRecord) -> None:
    """The task ended: every open wait with it (their wake-ups, when they fire, find nothing)."""
    now = time.time()
    for wid in list(rec.waits):
        end(rec, wid, "abandoned", now)


def held_back(rec: TaskRecord, step_id: str) -> bool:
    """Whether the step waits out a retry's backoff (not to be dispatched before it fires)."""
    return any(w.step_id == step_id and w.kind == "retry" for w in rec.waits.values())


def timer_due(node: TimerNode, inputs: dict[str, Any], outputs: dict[str, str], now: float) -> float:
    """When a timer node reached at ``now`` fires; ValueError if its ``until`` is not a time."""
    if node.after_s is not None:
        return now + node.after_s
    text = render(node.until or "", inputs, outputs).strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timer {node.id}: until {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise ValueError(f"timer {node.id}: until {text!r} has no offset (say Z or +hh:mm)")
    return when.timestamp()


def reach_wait(rec: TaskRecord, wf: WorkflowDefinition, sid: str, outputs: dict[str, str], now: float) -> str | None:
    """A ``timer`` or ``signal`` node is reached: it starts waiting, or (a signal kept from
    before) ends at once. Returns why it cannot wait (the node then fails), else None."""
    s, node = rec.steps[sid], wf.node(sid)
    s.status, s.attempt, s.wait = "dispatched", s.attempt + 1, node.kind
    if isinstance(node, TimerNode):
        try:
            fires = timer_due(node, rec.inputs, outputs, now)
        except ValueError as exc:
            return str(exc)
        start(
            rec, wait_id("fire", s.attempt, sid), WaitState(step_id=sid, kind="timer", due_at=fires, attempt=s.attempt)
        )
        event(rec, "step.waiting", f"{sid}: timer fires at {_iso(fires)}", sid, str(s.attempt))
        return None
    if isinstance(node, ApprovalNode):
        wid = wait_id("approval", s.attempt, sid)
        decision = hashlib.sha256(f"{rec.tenant}/{rec.task_id}/{wid}".encode()).hexdigest()[:16]
        due = now + node.timeout_s if node.timeout_s is not None else None
        request = render(node.request, rec.inputs, outputs)
        start(rec, wid, WaitState(step_id=sid, kind="approval", decision=decision, due_at=due, attempt=s.attempt,
                                  request=request[:4000]), request=request)  # fmt: skip
        event(rec, "step.waiting", f"{sid}: waits for an approver ({request[:200]}): meshctl review approve "
              f"{rec.task_id} --tenant {rec.tenant} --as approver.{rec.tenant}.<name>", sid, str(s.attempt))  # fmt: skip
        return None
    assert isinstance(node, SignalNode)
    kept = rec.signals.get(node.name)
    if kept is not None and not kept.taken_by:
        problem = payload_problem(node, kept.payload)
        if problem is None:
            take(rec, sid, node.name, kept)
            return None
        del rec.signals[node.name]  # refused: the node waits for one that fits
        event(rec, "signal.refused", f"{node.name} (kept): {problem}", sid, kept.msg_id)
    due = now + node.timeout_s if node.timeout_s is not None else None
    start(rec, wait_id("signal", s.attempt, sid),
          WaitState(step_id=sid, kind="signal", signal=node.name, due_at=due, attempt=s.attempt))  # fmt: skip
    until = f" (at most until {_iso(due)})" if due is not None else ""
    event(rec, "step.waiting", f"{sid}: waits for signal {node.name}{until}: meshctl signal {rec.task_id} "
          f"{node.name} --tenant {rec.tenant}", sid, str(s.attempt))  # fmt: skip
    return None


def payload_problem(node: SignalNode, payload: Any) -> str | None:
    if node.payload_schema is None:
        return None
    try:
        jsonschema.validate(payload, node.payload_schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        return f"{where + ': ' if where else ''}{exc.message}"[:500]
    except jsonschema.SchemaError as exc:
        return f"the node's payload_schema is unusable: {exc.message}"[:500]
    return None


def take(rec: TaskRecord, sid: str, name: str, sig: SignalState) -> None:
    """The signal node ``sid`` takes ``sig``: its payload is the node's output."""
    s = rec.steps[sid]
    sig.taken_by = sid
    rec.signals[name] = sig
    for wid in [k for k, w in rec.waits.items() if w.step_id == sid and w.kind == "signal"]:
        end(rec, wid, "signalled", time.time())
    complete(rec, s, json.dumps(sig.payload))
    event(rec, "signal.taken", f"{sid}: signal {name} from {sig.by}", sid, sig.msg_id)


def open_approval(rec: TaskRecord, decision: str) -> tuple[str, WaitState] | None:
    """The approval wait a reviewer's decision names (its ``decision`` id), if the task has it open."""
    return next(((k, w) for k, w in rec.waits.items() if w.kind == "approval" and w.decision == decision), None)


def approval_status(output: str) -> str:
    """An approval node's status as conditions see it: ``approved`` or ``denied``."""
    try:
        return "approved" if json.loads(output).get("approved") else "denied"
    except (ValueError, AttributeError):
        return "denied"


def complete(rec: TaskRecord, s: StepState, output: str) -> None:
    s.status, s.output = "completed", output
    event(rec, "step.completed", f"{s.step.step_id}: {output[:100]}", s.step.step_id, str(s.attempt))


def signal_outcome(rec: TaskRecord, wf: WorkflowDefinition | None, name: str, sig: SignalState) -> tuple[str, str]:
    """Apply a received signal: (``taken``/``kept``/``refused``, why). The record is changed for
    taken and kept; a refusal changes nothing but the events."""
    if rec.status in ("completed", "failed", "cancelled"):
        return "refused", f"task {rec.task_id} has ended ({rec.status})"
    nodes = [n for n in (wf.nodes if wf is not None else ()) if isinstance(n, SignalNode)]
    if not any(n.name == name for n in nodes):
        names = ", ".join(sorted({n.name for n in nodes})) or "none"
        return "refused", f"task {rec.task_id} waits for no signal named {name!r} (its signals: {names})"
    earlier = rec.signals.get(name)
    if earlier is not None:
        where = f"taken by {earlier.taken_by}" if earlier.taken_by else "kept for its node"
        return "refused", f"signal {name} was received already ({where}, from {earlier.by})"
    assert wf is not None
    for n in nodes:
        s = rec.steps.get(n.id)
        waiting = (
            s is not None
            and s.status == "dispatched"
            and any(w.step_id == n.id and w.kind == "signal" for w in rec.waits.values())
        )
        if n.name == name and waiting:
            problem = payload_problem(n, sig.payload)
            if problem is not None:
                return "refused", f"payload does not fit node {n.id}: {problem}"
            take(rec, n.id, name, sig)
            return "taken", n.id
    rec.signals[name] = sig
    event(rec, "signal.kept", f"signal {name} from {sig.by}: kept until its node is reached", "", sig.msg_id)
    return "kept", ""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
