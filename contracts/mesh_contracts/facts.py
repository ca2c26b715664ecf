"""What the budget may know of a message: its facts, never its content (issue 36).

The budget's monitor (breakers, deadlocks, stalls, queue time) needs ids, statuses, plan
dependencies, a task's limits and labels, and whether a call, a re-dispatched step or an answer
repeats itself. It reads them from the message's ``Mesh-Facts`` header, which the broker copies
with the other headers, and without the body, into the ENVELOPES stream
(``topology.ENVELOPES``); the budget holds no right to read the content streams themselves.

``facts`` is the one projection: the kit puts it in the header when it publishes (the identity
token covers the header), a consumer that reads the body checks that the two agree (``disagree``),
and the monitor folds it (it projects a whole message, a usage record or a unit test's, with the
same function, so the two paths cannot drift apart).

A content signature (``sig``) is a digest made by the producing service (``digest``): the kit keys
it with a secret of the producer (``mesh_identity.Signer.fingerprint``), so the budget can
tell that two calls repeat each other but cannot confirm a guess of what they said. Every kind of
signature has one producing service (tool and retrieval calls: the worker; dispatched steps and
answers to check: the planner), whose replicas share the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from mesh_contracts.base import Contract
from mesh_contracts.v1 import (
    ApprovalDecided,
    ApprovalRequested,
    CheckRequested,
    PlanCreated,
    PlanDrafted,
    PlanReviewed,
    RetrievalCompleted,
    RetrievalRequested,
    StepFailed,
    StepRequested,
    TaskLimits,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
    UsageRecorded,
    WaitEnded,
    WaitStarted,
)

HEADER = "Mesh-Facts"
SIG = "sig"
"""The one fact only its producer can compute (a keyed digest): left out of ``disagree``."""
AWAIT_TOOL = "await_step"
"""The tool an agent calls to wait for another step's output (an edge of the wait-for graph)."""

Digest = Callable[[Any], str]
Facts = dict[str, Any]


def canonical(value: Any) -> bytes:
    """One byte string per value (what a signature digests)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def plain_digest(value: Any) -> str:
    """An unkeyed signature: for a monitor fed whole messages (unit tests) and for comparisons
    that never leave the process."""
    return hashlib.sha256(canonical(value)).hexdigest()[:32]


def _call(tool: str, arguments: dict[str, Any]) -> list[Any]:
    # A retrieval is the call search_docs(query, top_k): the same repeated call either way.
    return ["call", tool, arguments]


def _submitted(m: TaskSubmitted, d: Digest) -> Facts:
    return {"limits": m.limits.model_dump(mode="json"), "labels": dict(m.labels)}


def _planned(m: PlanCreated, d: Digest) -> Facts:
    return {"steps": [[s.step_id, list(s.depends_on)] for s in m.steps]}


def _step_requested(m: StepRequested, d: Digest) -> Facts:
    out: Facts = {
        "step": m.step.step_id,
        "attempt": m.attempt,
        "max_iterations": m.max_iterations,
        SIG: d(["step", m.step.instruction, sorted(m.inputs.items())]),
    }
    if m.tries > 1:
        out["tries"] = m.tries
    return out


def _step_failed(m: StepFailed, d: Digest) -> Facts:
    return {"halted": m.halted}


def _tool_requested(m: ToolRequested, d: Digest) -> Facts:
    awaited = str(m.arguments.get("step_id", "")) if m.tool == AWAIT_TOOL else ""
    return {"call": m.call_id, "tool": m.tool, "await": awaited, SIG: d(_call(m.tool, m.arguments))}


def _retrieval_requested(m: RetrievalRequested, d: Digest) -> Facts:
    return {"call": m.call_id, SIG: d(_call("search_docs", {"query": m.query, "top_k": m.top_k}))}


def _tool_completed(m: ToolCompleted, d: Digest) -> Facts:
    return {"call": m.call_id, "ok": m.ok, "approval": m.approval_id}


def _retrieval_completed(m: RetrievalCompleted, d: Digest) -> Facts:
    return {"call": m.call_id}


def _check_requested(m: CheckRequested, d: Digest) -> Facts:
    return {SIG: d(["check", m.answer, [c.chunk_hash for c in m.citations]])}


def _approval(m: ApprovalRequested | ApprovalDecided, d: Digest) -> Facts:
    return {"approval": m.approval_id}


def _review(m: PlanDrafted | PlanReviewed, d: Digest) -> Facts:
    """A draft plan waits for a person as a held call does: its wait is not a stall."""
    return {"approval": f"review-{m.draft}"}


def _wait(m: WaitStarted | WaitEnded, d: Digest) -> Facts:
    """A workflow's timer, signal or retry backoff waits for the world as a held call waits for a
    person: its wait is not a stall."""
    return {"approval": f"wait-{m.wait_id}"}


def _usage(m: UsageRecorded, d: Digest) -> Facts:
    return {"call": m.call_id, "error": bool(m.error), "handed_on": bool(getattr(m, "handed_on", False))}


_PROJECTIONS: dict[type, Callable[[Any, Digest], Facts]] = {
    TaskSubmitted: _submitted,
    PlanCreated: _planned,
    StepRequested: _step_requested,
    StepFailed: _step_failed,
    ToolRequested: _tool_requested,
    RetrievalRequested: _retrieval_requested,
    ToolCompleted: _tool_completed,
    RetrievalCompleted: _retrieval_completed,
    CheckRequested: _check_requested,
    ApprovalRequested: _approval,
    ApprovalDecided: _approval,
    PlanDrafted: _review,
    PlanReviewed: _review,
    UsageRecorded: _usage,
    WaitStarted: _wait,
    WaitEnded: _wait,
}
_FOUND: dict[type, Callable[[Any, Digest], Facts] | None] = {}


def facts(m: Contract, digest: Digest = plain_digest) -> Facts:
    """The facts of ``m``: its step (when it names one) and what its type adds. Every other
    message (a task's end, a control message, a verdict...) is known by its type alone."""
    kind = type(m)
    if kind not in _FOUND:  # by its class or a base class of it (a later version subclassing v1)
        _FOUND[kind] = next((_PROJECTIONS[c] for c in kind.__mro__ if c in _PROJECTIONS), None)
    out: Facts = {}
    step = getattr(m, "step_id", "")
    if isinstance(step, str) and step:
        out["step"] = step
    projection = _FOUND[kind]
    if projection is not None:
        out.update(projection(m, digest))
    return out


def encode(f: Facts) -> str:
    """The header's value: compact JSON, ASCII only (a header is one line of printable ASCII)."""
    return json.dumps(f, sort_keys=True, separators=(",", ":"))


def _read(header: str) -> Facts | None:
    try:
        value = json.loads(header)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def decode(header: str | None) -> Facts:
    """The facts in a header ({} when there is none, or it is not a JSON object)."""
    return (_read(header) if header else None) or {}


def digest_of(header: str) -> str:
    """What the identity token says of the header (claim ``fct``)."""
    return hashlib.sha256(header.encode()).hexdigest()


def disagree(header: str, m: Contract) -> str | None:
    """The first fact in ``header`` that the body of ``m`` contradicts, or None. Only the facts
    both sides know are compared (a producer of another release may add or lack one), and not
    the signature, which only its producer can compute."""
    told = _read(header)
    if told is None:
        return "unreadable"
    own = facts(m, lambda _: "")
    for key in sorted(told.keys() & own.keys() - {SIG}):
        if _meaning(key, told[key]) != _meaning(key, own[key]):
            return key
    return None


def _meaning(key: str, value: Any) -> Any:
    """A fact as its reader takes it: limits with their defaults filled in (a client may write
    ``{}`` for a submission that sets none), anything else as it is."""
    if key == "limits":
        try:
            return TaskLimits.model_validate(value)
        except ValidationError:
            return None
    return value
