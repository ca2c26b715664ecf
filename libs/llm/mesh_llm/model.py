"""Provider-neutral chat types (OpenAI-style messages with tool calls)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "content": self.content,
            "tool_call_id": self.tool_call_id,
            "name": self.name,
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Message:
        return cls(
            role=d["role"],
            content=d.get("content", ""),
            tool_call_id=d.get("tool_call_id", ""),
            name=d.get("name", ""),
            tool_calls=tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in d.get("tool_calls", ())),
        )


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRequest:
    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_tokens: int = 512
    agent: str = ""
    """Which agent role is calling (``planner``, ``worker``, ``judge``); scripts key on it."""
    step: str = ""
    """Which step (or step kind) the call serves; scripts may key on it too."""
    temperature: float | None = None
    difficulty: str = ""
    """Routing hint for model tiering: ``easy`` | ``normal`` | ``hard`` ('' = the default route)."""
    cache: bool = False
    """Opt in to the response cache: an identical request (same tenant) is answered from it."""
    prompt_version: str = ""
    """Reference of the versioned prompt the request was built from (``planner.plan@1+ab12cd34``);
    recorded on the call's span and usage record. Not part of the fingerprint: the text is."""
    route: str = ""
    """A gateway route to take instead of the one ``agent`` and ``difficulty`` select (a replay's
    ``--model``); a route the gateway does not have fails the call (``UnknownRoute``)."""
    response_schema: dict[str, Any] | None = None
    """JSON Schema the answer's text must match (a plan, a step's ``output_schema``). A provider
    that can constrain its output to a schema does (OpenAI-compatible servers: ``response_format``
    ``json_schema``, which llama.cpp turns into a grammar); others ignore it, and the caller
    validates the answer as before."""
    tool_choice: str = "auto"
    """``auto``: the model may call an offered tool or answer; ``required``: it must call one (a step
    the plan made to call its tool: a small model calls none unless made to)."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the answer (the cache key is a hash of this)."""
        schema = {"response_schema": self.response_schema} if self.response_schema is not None else {}
        choice = {"tool_choice": self.tool_choice} if self.tool_choice != "auto" else {}  # keys as they were
        return (
            schema
            | choice
            | {
                "agent": self.agent,  # the scripted model (and routing) depend on role and step
                "step": self.step,
                "difficulty": self.difficulty,
                "messages": [m.to_dict() for m in self.messages],
                "tools": [
                    {"name": t.name, "description": t.description, "parameters": t.parameters} for t in self.tools
                ],
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        )


@dataclass(frozen=True)
class ModelResponse:
    content: str
    tool_calls: tuple[ToolCall, ...]
    input_tokens: int
    output_tokens: int
    provider: str
    model: str
    finish_reason: str = "stop"
    cached_input_tokens: int = 0
    """Part of ``input_tokens`` the provider served from its prompt cache."""


@dataclass(frozen=True)
class Timeouts:
    """Per-attempt time limits of a provider call."""

    connect_s: float = 5.0
    first_token_s: float = 30.0
    """From sending the request to the first byte of the answer (or first streamed token)."""
    idle_s: float = 30.0
    """Longest silence allowed between two streamed chunks (a stalled stream fails)."""
    total_s: float = 120.0


@dataclass(frozen=True)
class StreamEvent:
    """One item of a streamed completion: a text delta, or (last) the whole response."""

    text: str = ""
    response: ModelResponse | None = None


TokenSink = Callable[[str], Awaitable[None]]
"""Receives text deltas as the provider produces them."""


class ChatModel(Protocol):
    provider: str
    model: str
    context_window: int

    async def complete(self, request: ModelRequest) -> ModelResponse: ...

    def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Text deltas as they arrive; the last event carries the full ``ModelResponse``."""
        ...

    def count(self, request: ModelRequest) -> int:
        """Prompt tokens of ``request`` as this provider would bill them."""
        ...


def count_tokens(text: str) -> int:
    """Deterministic estimate (~4 characters a token); the scripted model bills with it."""
    return max(1, math.ceil(len(text) / 4)) if text else 0
