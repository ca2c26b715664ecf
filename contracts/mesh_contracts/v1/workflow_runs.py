"""A workflow task as it runs: the nodes ready next and the nodes skipped (``advance``), a node's
texts with their templates filled in (``render``), what this planner cannot run yet
(``not_runnable``), and the messages of the task's waits and signals (``wait.started``,
``wait.ended``, ``task.signal``). The definition itself is ``mesh_contracts.v1.workflow``.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from mesh_contracts.base import CLIENT, ID_PATTERN, Contract, ContractSpec
from mesh_contracts.decode import KB
from mesh_contracts.v1.workflow import TEMPLATE, WAITS, WorkflowDefinition, value_at


def advance(
    wf: WorkflowDefinition, ended: dict[str, tuple[str, Any]], started: set[str] | frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """What to do next: the nodes ready to run and the nodes to skip, given the nodes that
    ``ended`` (id -> (status, output); status ``skipped`` for a node skipped before) and those
    already ``started``. Skips propagate: the list holds every node now known to be skipped."""
    ended = dict(ended)
    ready: list[str] = []
    skipped: list[str] = []
    changed = True
    while changed:
        changed = False
        for i in wf.order():
            if i in ended or i in started or i in ready:
                continue
            edges = list(wf.node(i).edges())
            if any(e.node not in ended for e in edges):
                continue  # waits for what it needs
            verdicts = []
            for e in edges:
                status, output = ended[e.node]
                if status == "skipped":
                    verdicts.append("void")
                elif e.when is None or e.when.holds(status, output):
                    verdicts.append("taken")
                else:
                    verdicts.append("not taken")
            if "not taken" in verdicts or (verdicts and all(v == "void" for v in verdicts)):
                ended[i] = ("skipped", None)
                skipped.append(i)
                changed = True
            else:
                ready.append(i)
    return ready, skipped


def output_value(output: str) -> Any:
    """A node's output as conditions and templates see it: its JSON, or the text itself."""
    try:
        return json.loads(output)
    except (TypeError, ValueError):
        return output


def render(text: str, inputs: dict[str, Any], outputs: dict[str, str]) -> str:
    """``text`` with its templates filled in: ``{{inputs.<name>}}`` from the task's inputs,
    ``{{nodes.<id>.output}}`` with a node's output and ``{{nodes.<id>.output.<path>}}`` with a
    value in its JSON output. Strings go in as they are, other values as JSON; what is missing (a
    skipped node, a path its output lacks) as an empty string. Substitution is one pass: a value
    that itself looks like a template is not filled in again."""

    def value(match: re.Match[str]) -> str:
        parts = match.group(1).split(".")
        if parts[0] == "inputs":
            found, v = value_at(inputs, ".".join(parts[1:]))
        elif parts[0] == "nodes" and len(parts) >= 3 and parts[1] in outputs:
            found, v = value_at(output_value(outputs[parts[1]]), ".".join(parts[3:]))
            if len(parts) == 3:
                found, v = True, outputs[parts[1]]
        else:
            found, v = False, None
        if not found or v is None:
            return ""
        return v if isinstance(v, str) else json.dumps(v)

    return TEMPLATE.sub(value, text)


RUNNABLE = ("agent", "tool", "retrieve", "timer", "signal", "approval", "check")
"""Node kinds this version of the planner runs (the others are defined and validated already)."""


def not_runnable(wf: WorkflowDefinition) -> list[str]:
    """What in ``wf`` this planner cannot honour yet, each said once (empty: it runs as written).
    A task is refused rather than run with a setting silently ignored."""
    out = []
    for n in wf.nodes:
        if n.kind not in RUNNABLE:
            out.append(f"node {n.id!r} is {'an' if n.kind[0] in 'aeiou' else 'a'} {n.kind} node")
        if n.retry.attempts > 1 and n.kind in WAITS:
            out.append(f"{n.kind} node {n.id!r} sets retries (a wait is not retried)")
        if n.timeout_s is not None and n.kind == "timer":
            out.append(f"timer node {n.id!r} sets a timeout (a timer's time is its own)")
    if wf.mode == "auto":
        out.insert(0, "mode 'auto' (a workflow the model may replan is no workflow: submit the goal without one)")
    return out


# --- the running task's messages ------------------------------------------------------------

_RUN = {"tenant": "acme", "task_id": "t-7f3a"}


class TaskSignal(Contract):
    """A named signal to a running task (a workflow's ``signal`` node waits for it), sent by the
    tenant's app or ``meshctl signal`` and handed in at the tenant's door.

    The planner gives it to the node waiting for ``name``; a signal that arrives before the task
    reaches that node is kept and taken when it does (the first of a name, later ones are
    refused). ``payload`` becomes the node's output, checked against the node's
    ``payload_schema``; a payload that does not fit is refused and the node waits on. What
    became of it is told on the task's events (``signal.taken``, ``signal.kept``,
    ``signal.refused``) and on the audit chain."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**_RUN, "type": "task.signal", "name": "customer_replied", "payload": {"accepted": True}}]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "signal",
        producers=(CLIENT,),
        consumers=("planner",),
        summary="A named signal to a running workflow task.",
        max_bytes=64 * KB,
        sealed=("payload",),
    )

    type: Literal["task.signal"] = "task.signal"
    name: str = Field(pattern=ID_PATTERN)
    """The signal's name (what a ``signal`` node waits for)."""
    payload: Any = None
    """Any JSON value: the waiting node's output."""


WaitKind = Literal["timer", "signal", "retry", "approval"]


class WaitStarted(Contract):
    """A workflow task waits for the world, not for work: a timer, a signal, or the backoff before
    a node's next try. Until the matching ``wait.ended`` the budget counts the time as neither a
    stall nor a deadlock (as it does a person's decision)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**_RUN, "type": "wait.started", "wait_id": "fire-1-cool_off", "step_id": "cool_off",
                 "kind": "timer", "until": 1767225600.0}
            ]
        }
    )  # fmt: skip
    spec: ClassVar = ContractSpec(
        "task", "waiting", producers=("planner",), consumers=(CLIENT,), summary="A workflow task waits."
    )

    type: Literal["wait.started"] = "wait.started"
    wait_id: str = Field(pattern=ID_PATTERN)
    """Unique within the task (``wait.ended`` names it)."""
    step_id: str
    kind: WaitKind
    until: float | None = None
    """When the wait ends at the latest (unix seconds): a timer's due time, a retry's, a signal's
    timeout (None: a signal without one)."""
    signal: str = ""
    """The signal waited for (``kind`` signal)."""
    decision: str = Field("", pattern=r"^([0-9a-f]{16})?$")
    """``kind`` approval: the id a reviewer's ``plan.reviewed`` names as its ``draft`` to decide it
    (``meshctl review approve|reject``)."""
    request: str = Field("", max_length=4000)
    """``kind`` approval: what the approver is asked (the node's ``request``, filled in)."""


class WaitEnded(Contract):
    """A wait is over: ``fired`` (a timer, a retry's backoff), ``signalled``, ``approved`` or
    ``denied`` (an approval node), ``timed_out`` or ``abandoned`` (the task ended meanwhile)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**_RUN, "type": "wait.ended", "wait_id": "fire-1-cool_off", "step_id": "cool_off", "outcome": "fired",
                 "late_s": 0.004}
            ]
        }
    )  # fmt: skip
    spec: ClassVar = ContractSpec(
        "task", "waited", producers=("planner",), consumers=(CLIENT,), summary="A workflow task's wait is over."
    )

    type: Literal["wait.ended"] = "wait.ended"
    wait_id: str = Field(pattern=ID_PATTERN)
    step_id: str
    outcome: Literal["fired", "signalled", "approved", "denied", "timed_out", "abandoned"]
    late_s: float | None = None
    """How long after its due time it ended (a timer's or a retry's: how late the broker fired)."""
