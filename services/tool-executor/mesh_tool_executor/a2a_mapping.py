"""What an external A2A agent is as tools, and what its answers are as tool results (no I/O here;
the endpoint is ``remote_a2a.py``).

Card to tools. Each skill on the agent's card is one tool, named by the skill's id made fit for a
tool name (``[A-Za-z0-9_-]``, at most 30 characters, so that ``<server>__<tool>`` fits the mesh's
64; a clash gets ``_2``, ``_3``), described by the agent's name and description and the skill's
name, description and examples. A card without skills is one tool, ``ask``. Every tool takes one
``message`` (the text sent) and ``idempotency_key`` (filled by the executor with the call's
ledger key: the message's id is derived from it, so a retry or a failover sends the same message).

Pinning. Each tool's input schema carries ``x-agent-card-sha256``, the digest of the whole card's
canonical JSON, so a change anywhere on the card (a skill, the agent's description, its
interfaces, its security schemes, its version) changes the definition hash of every tool and the
tool-servers' pin check suspends them all until someone approves the new card. Only
``signatures`` is left out: a signature may differ at every signing of the same card. Interface
URLs on the card's own origin are pinned as paths, so replicas that each serve the same card from
their own host pin the same digest.

Answers. A completed task's answer is the text of its artifacts, else of its final status
message, else of the agent's last message; a direct message reply is its text. A failed, rejected
or canceled task, and a task that stops to ask for input or authorization (a tool call cannot
answer), are error results naming the agent's reason or question.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import httpx
import mcp.types as types
from a2a.types import AgentCard, AgentSkill, Message, Part, Role, Task, TaskState
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]  # no stubs installed

from mesh_contracts.v1.tool_servers import field_hash
from mesh_tool_executor.tool_servers import IDEMPOTENCY_ARG

CARD_PATH = "/.well-known/agent-card.json"
DIGEST_KEY = "x-agent-card-sha256"
ASK = "ask"
"""The one tool of an agent whose card lists no skills."""
_NAME_MAX = 30
_EXAMPLES = 5
_DESCRIPTION_MAX = 4000
_DEFAULT_PORTS = {"http": 80, "https": 443}

SETTLED = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_REJECTED,
        TaskState.TASK_STATE_INPUT_REQUIRED,
        TaskState.TASK_STATE_AUTH_REQUIRED,
    }
)
"""States after which the agent does no more on its own: the call's answer."""
FINISHED = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_REJECTED,
    }
)
"""Settled for good (an input- or auth-required task waits: it is canceled once answered)."""


# --- where the card is ------------------------------------------------------------------------------


def card_location(url: str) -> tuple[str, str]:
    """(base URL, path of the card) for the SDK's card resolver: a URL whose path ends in ``.json``
    is the card itself; any other is the agent's base URL, whose card is at ``CARD_PATH``."""
    parsed = httpx.URL(url)
    path = parsed.path if parsed.path.endswith(".json") else parsed.path.rstrip("/") + CARD_PATH
    query = parsed.query.decode("ascii", "replace")
    base = str(parsed.copy_with(path="/", query=None, fragment=None)).rstrip("/")
    return base, path + (f"?{query}" if query else "")


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL, or None if it is not an http(s) URL."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.host:
        return None
    return parsed.scheme, parsed.host.lower(), parsed.port or _DEFAULT_PORTS[parsed.scheme]


# --- card to tools -----------------------------------------------------------------------------------


def card_digest(card: AgentCard, card_url: str) -> str:
    """SHA-256 of the card's canonical JSON, as pinned (see the module docstring)."""
    data: dict[str, Any] = MessageToDict(card)
    data.pop("signatures", None)
    home = origin(card_url)
    for interface in data.get("supportedInterfaces", []):
        url = str(interface.get("url", ""))
        if home is not None and origin(url) == home:
            parsed = httpx.URL(url)
            interface["url"] = parsed.raw_path.decode("ascii", "replace")
    return field_hash(data)


def tool_name(raw: str, taken: set[str]) -> str:
    """A skill id as a tool name: ``[A-Za-z0-9_-]``, at most 30 characters, not in ``taken``."""
    base = re.sub(r"_{2,}", "_", re.sub(r"[^A-Za-z0-9_-]", "_", raw)).strip("_-")[:_NAME_MAX] or "skill"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base[: _NAME_MAX - len(str(n)) - 1]}_{n}"
    taken.add(name)
    return name


def _about(card: AgentCard) -> str:
    name = card.name or "(unnamed)"
    return f"A2A agent {name!r}" + (f": {card.description.strip()}" if card.description.strip() else "")


def _skill_text(card: AgentCard, skill: AgentSkill) -> str:
    lines = [_about(card), f"Skill {(skill.name or skill.id)!r}" + (f": {skill.description.strip()}"
                                                                  if skill.description.strip() else "")]  # fmt: skip
    examples = [e.strip() for e in skill.examples if e.strip()][:_EXAMPLES]
    if examples:
        lines.append("Examples: " + "; ".join(examples))
    return "\n".join(lines)[:_DESCRIPTION_MAX]


def input_schema(digest: str) -> dict[str, Any]:
    """What every tool of an agent takes: the message, and the idempotency key the executor fills."""
    return {
        "type": "object",
        "properties": {
            "message": {"type": "string", "minLength": 1, "description": "What to ask the agent, in plain text."},
            IDEMPOTENCY_ARG: {"type": "string"},
        },
        "required": ["message"],
        "additionalProperties": False,
        DIGEST_KEY: digest,
    }


def card_tools(card: AgentCard, card_url: str) -> tuple[list[types.Tool], dict[str, str]]:
    """The card's tools, and for each tool name the skill it asks ('' for ``ask``)."""
    digest = card_digest(card, card_url)
    tools: list[types.Tool] = []
    skills: dict[str, str] = {}
    taken: set[str] = set()
    for skill in card.skills:
        name = tool_name(skill.id or skill.name, taken)
        tools.append(types.Tool(name=name, description=_skill_text(card, skill), input_schema=input_schema(digest)))
        skills[name] = skill.id
    if not tools:
        text = f"{_about(card)}\nIts card lists no skills: ask it anything it says it can do."
        tools.append(types.Tool(name=ASK, description=text[:_DESCRIPTION_MAX], input_schema=input_schema(digest)))
        skills[ASK] = ""
    return tools, skills


# --- answers to results ------------------------------------------------------------------------------


def parts_text(parts: Iterable[Part]) -> list[str]:
    """Each part as text: text as is, data as JSON, files named (their bytes are not read)."""
    out: list[str] = []
    for part in parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            out.append(part.text)
        elif kind == "data":
            out.append(json.dumps(MessageToDict(part.data), ensure_ascii=False, sort_keys=True))
        elif kind == "url":
            out.append(f"[file {part.filename or ''} ({part.media_type or 'unknown type'}) at {part.url}]")
        elif kind == "raw":
            out.append(f"[{len(part.raw)} bytes of {part.media_type or 'data'} omitted]")
    return [t for t in out if t]


def _status_text(task: Task) -> str:
    return "\n".join(parts_text(task.status.message.parts)) if task.status.HasField("message") else ""


def _answer(task: Task) -> str:
    artifacts = ["\n".join(parts_text(a.parts)) for a in task.artifacts]
    text = "\n\n".join(a for a in artifacts if a) or _status_text(task)
    if not text:
        said = [m for m in task.history if m.role == Role.ROLE_AGENT]
        text = "\n".join(parts_text(said[-1].parts)) if said else ""
    return text


def _result(text: str, *, error: bool) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=error)


def outcome(reply: Task | Message) -> types.CallToolResult:
    """The tool result of the agent's reply once settled (a direct message, or a task in ``SETTLED``)."""
    if isinstance(reply, Message):
        return _result("\n".join(parts_text(reply.parts)) or "(the agent answered with an empty message)", error=False)
    state = reply.status.state
    if state == TaskState.TASK_STATE_COMPLETED:
        return _result(_answer(reply) or "(the agent completed the task without an answer)", error=False)
    reason = _status_text(reply) or "(no reason given)"
    if state == TaskState.TASK_STATE_INPUT_REQUIRED:
        return _result(f"the agent asked for more input, which a tool call cannot give: {reason}", error=True)
    if state == TaskState.TASK_STATE_AUTH_REQUIRED:
        return _result(f"the agent asked for authorization, which a tool call cannot give: {reason}", error=True)
    verb = {TaskState.TASK_STATE_FAILED: "failed", TaskState.TASK_STATE_REJECTED: "rejected",
            TaskState.TASK_STATE_CANCELED: "canceled"}.get(state, "ended")  # fmt: skip
    return _result(f"the agent {verb} the task: {reason}", error=True)
