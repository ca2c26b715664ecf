"""Provider-neutral chat types (OpenAI-style messages with tool calls)."""

from __future__ import annotations

import math
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


class ChatModel(Protocol):
    provider: str
    model: str

    async def complete(self, request: ModelRequest) -> ModelResponse: ...

    def count(self, request: ModelRequest) -> int:
        """Prompt tokens of ``request`` as this provider would bill them."""
        ...


def count_tokens(text: str) -> int:
    """Deterministic estimate (~4 characters a token); the scripted model bills with it."""
    return max(1, math.ceil(len(text) / 4)) if text else 0
