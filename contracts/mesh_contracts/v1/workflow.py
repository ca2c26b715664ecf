"""Workflow definitions: the shape of a process a tenant fixes in advance (issue 40).

A workflow is a DAG a tenant writes in YAML or JSON. Its nodes are the things a task can do:

- ``agent``: a model-driven step (an instruction, the tools it may call, a model tier), what the
  planner's steps are today;
- ``tool``: one tool call with arguments fixed here (templated from the inputs and earlier nodes);
- ``retrieve``: a retrieval from the tenant's documents;
- ``approval``: a person's decision before anything after it runs;
- ``check``: the checker's verdict on an earlier node's output;
- ``timer``: wait a duration, or until a time;
- ``signal``: wait for a named signal from outside (an app, ``meshctl signal``).

Edges are the ``after`` lists: a node is decided once every node it is after has ended or been
skipped. An edge may carry a condition on an earlier node's result (``when``): data, not code (a
status, or a path into the node's JSON output, an operator and a value), so a definition can be
validated, diffed and shown, and running one evaluates nothing a tenant wrote. Each edge is then
*taken* (its node ran, and its condition holds or it has none), *not taken* (its node ran and the
condition does not hold) or *void* (its node was skipped). A node is skipped if one of its edges
is not taken, or if all of them are void (nothing it needs ran); otherwise it runs, void edges
ignored. So a branch that was not taken does not stop what joins after it
(``workflow_runs.advance``).

Each node may set retries with exponential backoff, a timeout and a share of the task's budget.

A definition is identified by its content: ``digest()`` is the SHA-256 of its canonical JSON, so
the same definition has the same version wherever it is published, and a version cannot change.
Validation is strict: unknown fields are refused (a misspelt ``retires`` is an error, not a
silently ignored setting), references must name earlier nodes, and the graph must be acyclic.

How a definition runs (``advance``, ``render``, ``not_runnable``, and the messages of a running
task's waits and signals) is ``mesh_contracts.v1.workflow_runs``; how a task names a version and
an author changes the tenant's versions, ``mesh_contracts.v1.workflow_versions``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1.check import CHECK_NAMES

SCHEMA_VERSION = 1
MAX_NODES = 64
"""Nodes per workflow, at most (a plan has at most ``TaskLimits.max_steps`` steps today; a
workflow also has gates and waits)."""
TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
"""``{{inputs.x}}``, ``{{nodes.<id>.output}}`` or ``{{nodes.<id>.output.<path>}}`` in a node's text."""


class _Strict(BaseModel):
    """Written by people: an unknown field is a mistake to point at, not a field to keep."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Retry(_Strict):
    """How often a node is tried, and how long between tries (``backoff_s``, times ``multiplier``
    after each failure, at most ``max_backoff_s``)."""

    attempts: int = Field(1, ge=1, le=10)
    """Tries in all (1: no retry)."""
    backoff_s: float = Field(1.0, ge=0, le=3600)
    multiplier: float = Field(2.0, ge=1, le=10)
    max_backoff_s: float = Field(300.0, ge=0, le=86400)

    def delays(self) -> list[float]:
        """The wait before each retry, in order (``attempts - 1`` of them)."""
        out, wait = [], self.backoff_s
        for _ in range(self.attempts - 1):
            out.append(min(wait, self.max_backoff_s))
            wait *= self.multiplier
        return out


Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists"]


class Condition(_Strict):
    """A test of an earlier node's result: its ``status`` (``completed``, ``failed``,
    ``skipped``, or an approval's ``approved`` / ``denied``), or a value at ``path`` in its JSON
    output (dot-separated keys; empty: the whole output)."""

    status: str | None = None
    path: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
    op: Op = "eq"
    value: Any = None

    @model_validator(mode="after")
    def _one_test(self) -> Condition:
        if (self.status is None) == (self.path is None):
            raise ValueError("a condition tests either 'status' or a 'path' of the output, not both or neither")
        if self.status is not None and self.op not in ("eq", "ne"):
            raise ValueError(f"a status condition compares with 'eq' or 'ne', not {self.op!r}")
        return self

    def holds(self, status: str, output: Any) -> bool:
        """Whether the condition holds for a node that ended with ``status`` and ``output`` (its
        JSON output parsed, or its text)."""
        if self.status is not None:
            return (status == self.status) == (self.op == "eq")
        found, value = value_at(output, self.path or "")
        if self.op == "exists":
            return found == bool(self.value if self.value is not None else True)
        if not found:
            return self.op == "ne"
        try:
            match self.op:
                case "eq":
                    return bool(value == self.value)
                case "ne":
                    return bool(value != self.value)
                case "gt":
                    return bool(value > self.value)
                case "gte":
                    return bool(value >= self.value)
                case "lt":
                    return bool(value < self.value)
                case "lte":
                    return bool(value <= self.value)
                case "contains":
                    return bool(self.value in value)
                case _:  # "in"
                    return bool(value in self.value)
        except TypeError:  # compared across types (a string with a number): does not hold
            return False

    def describe(self, node: str) -> str:
        if self.status is not None:
            return f"{node} {'is' if self.op == 'eq' else 'is not'} {self.status}"
        where = f"{node}.{self.path}" if self.path else node
        return f"{where} {self.op} {json.dumps(self.value)}" if self.op != "exists" else f"{where} exists"


def value_at(output: Any, path: str) -> tuple[bool, Any]:
    """The value at a dot-separated path (a number indexes a list: ``hits.0.doc_id``)."""
    value = output
    for key in [k for k in path.split(".") if k]:
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return False, None
    return True, value


class Edge(_Strict):
    """The node runs after ``node``, and only if ``when`` holds for ``node``'s result."""

    node: str = Field(pattern=ID_PATTERN)
    when: Condition | None = None


class _Node(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    """Unique within the workflow; what ``after``, conditions and templates name."""
    title: str = Field("", max_length=200)
    """A human name for the node (the DAG's label); the id if empty."""
    after: tuple[str | Edge, ...] = ()
    """The nodes this one runs after (each an id, or an edge with a condition)."""
    retry: Retry = Retry()
    timeout_s: float | None = Field(None, gt=0, le=30 * 86400)
    """How long one try may take (a wait: how long it may wait) before it fails (None: the
    task's own limits)."""
    budget_share: float | None = Field(None, gt=0, le=1)
    """The share of the task's token and cost ceilings this node may spend, every try and check
    together (None: no cap of its own): the budget refuses a model call of the node that would
    pass it (``step_tokens`` / ``step_cost``), and the node's try fails."""

    def edges(self) -> Iterator[Edge]:
        for a in self.after:
            yield a if isinstance(a, Edge) else Edge(node=a)

    def texts(self) -> Iterator[str]:
        """Every text of the node that may hold templates."""
        return iter(())


class AgentNode(_Node):
    """A model-driven step: the worker runs ``instruction`` with the tools listed, on the model
    tier given (what a planned step is today)."""

    kind: Literal["agent"] = "agent"
    instruction: str = Field(min_length=1, max_length=4000)
    tools: tuple[str, ...] = ()
    """The tools the step may call (``search_docs``: retrieval); nothing else."""
    tier: Literal["", "easy", "normal", "hard"] = ""
    """The model route ('' the default; the model gateway's tiers)."""
    role: Literal["research", "compute", "write", "answer"] = "research"
    output_schema: dict[str, Any] | None = None
    """JSON Schema the step's output must match (conditions can then test its fields)."""
    agent: str = Field("", max_length=64, pattern=r"^([a-z0-9][a-z0-9_-]{0,47})?$")
    """One of the tenant's agent profiles that runs the node (its current version when a task
    starts the workflow is pinned for the task): its instructions, model, tools and pool. The
    node's ``tools`` are narrowed to the profile's. '' : the worker's own."""

    def texts(self) -> Iterator[str]:
        yield self.instruction


class ToolNode(_Node):
    """One call of ``tool`` with ``arguments`` (string values may hold templates), under the
    tool policy like any other call."""

    kind: Literal["tool"] = "tool"
    tool: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    arguments: dict[str, Any] = {}

    def texts(self) -> Iterator[str]:
        yield from _strings(self.arguments)


class RetrieveNode(_Node):
    """A retrieval from the tenant's documents: ``query`` (templated), the ``top_k`` best."""

    kind: Literal["retrieve"] = "retrieve"
    query: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(5, ge=1, le=50)

    def texts(self) -> Iterator[str]:
        yield self.query


class ApprovalNode(_Node):
    """A person decides (the tenant's named approvers) before anything after it runs. Its status
    is ``approved`` or ``denied``; ``on_denied: fail`` ends the task, ``continue`` lets
    conditions on it choose the branch."""

    kind: Literal["approval"] = "approval"
    request: str = Field(min_length=1, max_length=4000)
    """What the approver is asked (templated: it may quote earlier outputs)."""
    on_denied: Literal["fail", "continue"] = "fail"

    def texts(self) -> Iterator[str]:
        yield self.request


class CheckNode(_Node):
    """The checker's verdict on ``of``'s output, mid-run: the named checks decide it (``judge``
    with ``min_score``, else the task policy's). Passed, the node completes (its output
    ``{"passed": true, "score": ...}``); failed with tries left (``retry.attempts`` counts the
    checks), ``of`` and the nodes between it and the check run again, after the backoff, told the
    checker's reasons, and are checked again; failed on its last try, the node fails (and the task)."""

    kind: Literal["check"] = "check"
    of: str = Field(pattern=ID_PATTERN)
    checks: tuple[str, ...] = Field(("citations_resolve", "judge"), min_length=1)
    """Names among the checker's checks (``CHECK_NAMES``)."""
    min_score: float | None = Field(None, ge=0, le=1)


class TimerNode(_Node):
    """Waits ``after_s`` seconds from when it is reached, or until ``until`` (an ISO 8601 time
    with its offset, or a template naming one). Durable: it fires after a restart too."""

    kind: Literal["timer"] = "timer"
    after_s: float | None = Field(None, gt=0, le=365 * 86400)
    until: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_time(self) -> TimerNode:
        if (self.after_s is None) == (self.until is None):
            raise ValueError(f"timer {self.id!r} waits either 'after_s' or 'until', not both or neither")
        return self

    def texts(self) -> Iterator[str]:
        if self.until:
            yield self.until


class SignalNode(_Node):
    """Waits for the signal ``name`` sent to the task (``meshctl signal``, or the versioned
    ``task.signal`` message an app publishes); its payload is the node's output, checked
    against ``payload_schema`` if given. ``timeout_s`` bounds the wait."""

    kind: Literal["signal"] = "signal"
    name: str = Field(pattern=ID_PATTERN)
    payload_schema: dict[str, Any] | None = None


Node = Annotated[
    AgentNode | ToolNode | RetrieveNode | ApprovalNode | CheckNode | TimerNode | SignalNode,
    Field(discriminator="kind"),
]
WAITS = ("approval", "timer", "signal")
"""Node kinds that wait for the world, not for work: neither a stall nor a deadlock."""


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


class WorkflowDefinition(_Strict):
    """A workflow as a tenant writes it (``schema_version`` 1)."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=ID_PATTERN)
    description: str = Field("", max_length=2000)
    mode: Literal["auto", "review", "fixed"] = "fixed"
    """How a task that names it is planned: ``fixed``, only these nodes run (the model fills in
    their inputs, and cannot add nodes, tools or edges); ``review``, the model drafts a plan from
    it and a named reviewer approves it before it runs; ``auto``, the model's plan runs."""
    inputs: dict[str, Any] | None = None
    """JSON Schema of the inputs a task gives the workflow (``{{inputs.<name>}}`` in node texts)."""
    nodes: tuple[Node, ...] = Field(min_length=1, max_length=MAX_NODES)
    output: str | None = Field(None, pattern=ID_PATTERN)
    """The node whose output is the task's answer (None: the one node nothing runs after)."""

    @model_validator(mode="after")
    def _a_dag(self) -> WorkflowDefinition:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def problems(self) -> list[str]:
        """Everything wrong with the graph, each said once (empty: a valid workflow)."""
        out: list[str] = []
        ids = [n.id for n in self.nodes]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                out.append(f"node id {i!r} is used twice")
            seen.add(i)
        by_id = {n.id: n for n in self.nodes}
        for n in self.nodes:
            for e in n.edges():
                if e.node not in by_id:
                    out.append(f"node {n.id!r} runs after {e.node!r}, which is not a node")
                elif e.node == n.id:
                    out.append(f"node {n.id!r} runs after itself")
            if isinstance(n, CheckNode) and n.of not in by_id:
                out.append(f"check {n.id!r} checks {n.of!r}, which is not a node")
            if isinstance(n, CheckNode):
                for name in n.checks:
                    if name not in CHECK_NAMES:
                        out.append(f"check {n.id!r} names no check {name!r} (the checker's: {', '.join(CHECK_NAMES)})")
        if out:
            return out
        placed = self._placed()
        if len(placed) < len(by_id):
            return [f"the graph has a cycle through {', '.join(sorted(set(by_id) - set(placed)))}"]
        before = self.ancestors()
        for n in self.nodes:
            if isinstance(n, CheckNode) and n.of not in before[n.id]:
                out.append(f"check {n.id!r} must run after {n.of!r}, the node it checks")
            for text in n.texts():
                for ref in TEMPLATE.findall(text):
                    out.extend(self._reference(n.id, ref, before[n.id]))
        sinks = [n.id for n in self.nodes if not any(n.id in before[m.id] for m in self.nodes)]
        if self.output is not None and self.output not in by_id:
            out.append(f"output {self.output!r} is not a node")
        elif self.output is None and len(sinks) > 1:
            out.append(f"several nodes end the workflow ({', '.join(sinks)}): say which is its 'output'")
        shares = sum(n.budget_share or 0 for n in self.nodes)
        if shares > 1 + 1e-9:
            out.append(f"the nodes' budget shares add up to {shares:g}, more than the whole budget (1)")
        return out

    def _reference(self, node: str, ref: str, before: set[str]) -> list[str]:
        parts = ref.split(".")
        if parts[0] == "inputs" and len(parts) >= 2:
            props = (self.inputs or {}).get("properties")
            if isinstance(props, dict) and parts[1] not in props:
                return [f"node {node!r} uses {{{{{ref}}}}}, an input the workflow does not declare"]
            return []
        if parts[0] == "nodes" and len(parts) >= 3 and parts[2] == "output":
            if parts[1] not in before:
                return [f"node {node!r} uses the output of {parts[1]!r}, which does not run before it"]
            return []
        return [f"node {node!r} uses {{{{{ref}}}}}: a template names inputs.<name> or nodes.<id>.output[.<path>]"]

    def _placed(self) -> list[str]:
        """Node ids, each after every node it runs after, in the file's order otherwise: all of
        them, short of the nodes on a cycle and those after one."""
        needs = {n.id: {e.node for e in n.edges()} for n in self.nodes}
        out: list[str] = []
        changed = True
        while changed:
            changed = False
            for i, req in needs.items():
                if i not in out and req <= set(out):
                    out.append(i)
                    changed = True
        return out

    def order(self) -> list[str]:
        """Node ids, each after every node it runs after (the file's order otherwise)."""
        return self._placed()

    def ancestors(self) -> dict[str, set[str]]:
        """For each node, every node that runs before it (transitively)."""
        direct = {n.id: {e.node for e in n.edges()} for n in self.nodes}
        out: dict[str, set[str]] = {}
        for i in self._placed():
            out[i] = set(direct[i])
            for d in direct[i]:
                out[i] |= out.get(d, set())
        return out

    def between(self, first: str, last: str) -> set[str]:
        """``first`` and every node on a path from it to ``last`` (``last`` not included)."""
        before = self.ancestors()
        return {n.id for n in self.nodes if n.id in before[last] and (n.id == first or first in before[n.id])}

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def answer_node(self) -> str:
        if self.output is not None:
            return self.output
        before = self.ancestors()
        return next(n.id for n in self.nodes if not any(n.id in before[m.id] for m in self.nodes))

    def canonical(self) -> bytes:
        """The definition's canonical JSON (defaults filled in, keys sorted): what its digest is of."""
        raw = self.model_dump(mode="json")
        for node in raw["nodes"]:
            if node.get("agent") == "":
                del node["agent"]  # a field added later: a definition without it keeps its version
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """The version: the SHA-256 of the canonical JSON, its first 16 hex digits (64 bits)."""
        return hashlib.sha256(self.canonical()).hexdigest()[:16]

    def ref(self) -> str:
        return f"{self.name}@{self.digest()}"
