"""What an A2A message asks of the mesh: which mesh task it is, its goal, inputs and policy, or a
person's decision on a held call. Pure functions: no I/O."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from a2a.helpers import get_data_parts, get_text_parts
from a2a.types import Message
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]  # protobuf ships no stubs
from pydantic import ValidationError

from mesh_a2a.errors import BadAsk
from mesh_a2a.exposed import Agent
from mesh_contracts.v1 import TaskPolicy, TaskSubmitted

TASK_PREFIX = "a2a-"
"""Every mesh task the gateway submits has an id of this prefix (``meshctl history a2a-...``)."""
MAX_CONTEXT_CHARS = 128
GOAL_MAX: int = next(m.max_length for m in TaskSubmitted.model_fields["goal"].metadata if hasattr(m, "max_length"))
"""The longest goal a task may have (``TaskSubmitted.goal``)."""
APPROVE = frozenset({"approve", "approved", "yes", "y", "ok", "allow", "accept"})
DENY = frozenset({"deny", "denied", "no", "n", "reject", "refuse", "decline"})
LABEL_USER, LABEL_CONTEXT, LABEL_AGENT = "user", "a2a.context", "a2a.agent"


def task_id_for(tenant: str, subject: str, agent: str, message_id: str) -> str:
    """The mesh task id (which is the A2A task id) of a message that starts a task: the same
    message id from the same person to the same agent is the same task, so a retried send is one
    mesh task (the edge's ``Idempotency-Key``, with A2A's message id as the key)."""
    digest = hashlib.sha256(f"{tenant}\0{subject}\0{agent}\0{message_id}".encode()).hexdigest()
    return TASK_PREFIX + digest[:24]


def context_id_for(task_id: str) -> str:
    """The context id of a task whose first message named none (derived: a retry gets the same)."""
    return "ctx-" + task_id.removeprefix(TASK_PREFIX)


def labels_for(subject: str, context_id: str, agent: str) -> dict[str, str]:
    """The mesh task's labels: who asked (as the edge's), the A2A context and agent (how ``GetTask``
    finds the task again on any replica, after any restart)."""
    if len(context_id) > MAX_CONTEXT_CHARS:
        raise BadAsk(f"a context id is at most {MAX_CONTEXT_CHARS} characters")
    return {LABEL_USER: subject, LABEL_CONTEXT: context_id, LABEL_AGENT: agent}


@dataclass(frozen=True)
class Ask:
    """A task the mesh can run, from one A2A message."""

    goal: str
    inputs: dict[str, Any] = field(default_factory=dict)
    policy: TaskPolicy = field(default_factory=TaskPolicy)
    priority: int = 5


def _whole(value: Any) -> Any:
    """JSON as it was sent: a data part's numbers come back from protobuf as floats (4 as 4.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def metadata_of(message: Message) -> dict[str, Any]:
    return _whole(MessageToDict(message.metadata)) if message.HasField("metadata") else {}


def ask_of(message: Message, agent: Agent, metadata: dict[str, Any] | None = None) -> Ask:
    """The task a message asks for: its text parts are the goal, one data part (an object) the
    inputs of a workflow; ``metadata`` (the request's, then the message's own) may carry
    ``policy`` (a ``TaskPolicy``, as the edge's body does) and ``priority`` (0-9).
    ``BadAsk`` says in one line what is wrong."""
    goal = "\n".join(t.strip() for t in get_text_parts(message.parts) if t.strip())
    data = [_whole(d) for d in get_data_parts(message.parts)]
    if len(data) > 1 or any(not isinstance(d, dict) for d in data):
        raise BadAsk("at most one data part, a JSON object: the workflow's inputs")
    inputs: dict[str, Any] = data[0] if data else {}
    if inputs and agent.kind != "workflow":
        raise BadAsk(f"{agent.name} takes no inputs (no data part): say the goal in words")
    if not goal:
        if agent.kind != "workflow":
            raise BadAsk("the message has no text: its text parts are the goal")
        goal = f"Run the {agent.name} workflow"
    if len(goal) > GOAL_MAX:
        raise BadAsk(f"the goal is longer than {GOAL_MAX} characters")
    meta = {**(metadata or {}), **metadata_of(message)}
    try:
        policy = TaskPolicy.model_validate(meta.get("policy") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadAsk(f"metadata.policy: {first['msg']} ({'.'.join(map(str, first['loc']))})") from None
    priority = meta.get("priority", 5)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 9:
        raise BadAsk("metadata.priority is 0-9")
    return Ask(goal, inputs, policy, priority)


@dataclass(frozen=True)
class Decision:
    """A person's answer to a held call: approve or not, why, and (optionally) which call."""

    approve: bool
    comment: str = ""
    approval_id: str = ""


_WORD = re.compile(r"[A-Za-z]+")


def decision_of(message: Message) -> Decision | None:
    """The decision a follow-up message carries: a data part ``{"approve": true|false,
    "comment"?, "approval_id"?}``, or text whose first word says it (``approve``, ``yes``, ``deny``,
    ``no``...; the rest is the comment). None: it says neither."""
    for data in get_data_parts(message.parts):
        if isinstance(data, dict) and isinstance(data.get("approve"), bool):
            comment, approval = data.get("comment", ""), data.get("approval_id", "")
            return Decision(data["approve"], str(comment)[:2000], str(approval))
    text = " ".join(get_text_parts(message.parts)).strip()
    first = _WORD.match(text)
    if first is None:
        return None
    word = first.group(0).lower()
    if word not in APPROVE | DENY:
        return None
    comment = text[first.end() :].strip(" \t\n.,:;-!")
    return Decision(word in APPROVE, comment[:2000])
