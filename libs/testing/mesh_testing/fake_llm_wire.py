"""The fake LLM server's two wire protocols: OpenAI chat completions and Anthropic Messages.

Both directions live here: a wire request back into a ``ModelRequest`` (the providers'
conversion in reverse, written independently so a test catches a provider that gets it
wrong), and a ``ModelResponse`` out as a JSON body or a list of SSE events, chunked finely
(a word per text delta, tool arguments in several fragments) so that the providers'
stream assembly is really exercised.
"""

from __future__ import annotations

import asyncio
import http
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from mesh_llm.model import Message, ModelRequest, ModelResponse, ToolCall, ToolSpec
from mesh_testing.errors import TestingError

OPENAI = "openai"
ANTHROPIC = "anthropic"


class WireError(ValueError, TestingError):
    """The request body does not follow the protocol (answered with a 400)."""


def infer_agent(messages: tuple[Message, ...]) -> str:
    """The agent role the scripted brain keys on, read from the system prompt."""
    system = " ".join(m.content for m in messages if m.role == "system").lower()
    if "planner" in system:
        return "planner"
    if "judge" in system or "reviewer of answers" in system:  # the checker's judge prompt
        return "judge"
    return "worker"


# --- wire request → ModelRequest ----------------------------------------------------------


def to_model_request(protocol: str, body: dict[str, Any]) -> ModelRequest:
    """Decode a chat-completions or Messages request body."""
    try:
        if protocol == OPENAI:
            messages, tools = _openai_messages(body["messages"]), _openai_tools(body.get("tools") or [])
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 512
        else:
            messages, tools = _anthropic_messages(body), _anthropic_tools(body.get("tools") or [])
            max_tokens = body["max_tokens"]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise WireError(f"invalid request body: {type(exc).__name__}: {exc}") from None
    return ModelRequest(
        messages,
        tools,
        int(max_tokens),
        agent=infer_agent(messages),
        temperature=body.get("temperature"),
    )


def _openai_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def _openai_messages(raw: list[dict[str, Any]]) -> tuple[Message, ...]:
    out: list[Message] = []
    names: dict[str, str] = {}  # tool messages carry no name on the wire: the call id links them
    for m in raw:
        role, content = m["role"], _openai_text(m.get("content"))
        if role == "tool":
            call_id = m["tool_call_id"]
            out.append(Message("tool", content, tool_call_id=call_id, name=names.get(call_id, "")))
        elif role == "assistant":
            calls = tuple(
                ToolCall(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"))
                for c in m.get("tool_calls") or []
            )
            names |= {c.id: c.name for c in calls}
            out.append(Message("assistant", content, calls, name=m.get("name", "")))
        elif role in ("system", "developer"):
            out.append(Message("system", content, name=m.get("name", "")))
        elif role == "user":
            out.append(Message("user", content, name=m.get("name", "")))
        else:
            raise ValueError(f"unknown role {role!r}")
    return tuple(out)


def _openai_tools(raw: list[dict[str, Any]]) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(t["function"]["name"], t["function"].get("description", ""), t["function"].get("parameters") or {})
        for t in raw
    )


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _anthropic_messages(body: dict[str, Any]) -> tuple[Message, ...]:
    out: list[Message] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else "".join(b["text"] for b in system if b["type"] == "text")
        out.append(Message("system", text))
    names: dict[str, str] = {}
    for turn in body["messages"]:
        blocks = _blocks(turn["content"])
        if turn["role"] == "assistant":
            text = "".join(b["text"] for b in blocks if b["type"] == "text")
            calls = tuple(ToolCall(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use")
            names |= {c.id: c.name for c in calls}
            out.append(Message("assistant", text, calls))
        elif turn["role"] == "user":
            # One message per block: a merged turn splits back into the messages it came from.
            for b in blocks:
                if b["type"] == "tool_result":
                    call_id = b["tool_use_id"]
                    text = "".join(x["text"] for x in _blocks(b.get("content") or []) if x["type"] == "text")
                    out.append(Message("tool", text, tool_call_id=call_id, name=names.get(call_id, "")))
                elif b["type"] == "text":
                    out.append(Message("user", b["text"]))
        else:
            raise ValueError(f"unknown role {turn['role']!r}")
    return tuple(out)


def _anthropic_tools(raw: list[dict[str, Any]]) -> tuple[ToolSpec, ...]:
    return tuple(ToolSpec(t["name"], t.get("description", ""), t.get("input_schema") or {}) for t in raw)


# --- ModelResponse → wire -----------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One SSE event to write; ``content`` marks those that carry answer tokens."""

    data: str
    event: str = ""
    content: bool = False

    def encode(self) -> bytes:
        head = f"event: {self.event}\n" if self.event else ""
        return f"{head}data: {self.data}\n\n".encode()


def words(text: str) -> list[str]:
    """``text`` in word-sized pieces whose concatenation is ``text``."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def fragments(text: str, parts: int = 3) -> list[str]:
    """``text`` cut into up to ``parts`` non-empty pieces (tool arguments streamed piecemeal)."""
    cuts = sorted({len(text) * i // parts for i in range(parts + 1)})
    return [text[a:b] for a, b in itertools.pairwise(cuts) if text[a:b]] or [text]


def _dumps(value: Any) -> str:
    # ensure_ascii=False: real servers send UTF-8, including U+2028 a naive line splitter breaks on
    return json.dumps(value, ensure_ascii=False)


_OPENAI_FINISH = {"stop": "stop", "tool_calls": "tool_calls", "length": "length"}
_ANTHROPIC_STOP = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def openai_usage(r: ModelResponse) -> dict[str, Any]:
    return {
        "prompt_tokens": r.input_tokens,
        "completion_tokens": r.output_tokens,
        "total_tokens": r.input_tokens + r.output_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_input_tokens},
    }


def anthropic_usage(r: ModelResponse) -> dict[str, Any]:
    # Anthropic's input_tokens leaves out the cached part, which it reports on its own.
    return {
        "input_tokens": r.input_tokens - r.cached_input_tokens,
        "cache_read_input_tokens": r.cached_input_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": r.output_tokens,
    }


def openai_body(r: ModelResponse, model: str, n: int, *, usage: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": r.content or None}
    if r.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _dumps(c.arguments)}}
            for c in r.tool_calls
        ]
    body: dict[str, Any] = {
        "id": f"chatcmpl-fake{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": _OPENAI_FINISH.get(r.finish_reason, "stop")}],
    }
    if usage:
        body["usage"] = openai_usage(r)
    return body


def anthropic_body(r: ModelResponse, model: str, n: int, *, usage: bool = True) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": r.content}] if r.content else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in r.tool_calls]
    body: dict[str, Any] = {
        "id": f"msg_fake{n}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _ANTHROPIC_STOP.get(r.finish_reason, "end_turn"),
        "stop_sequence": None,
    }
    if usage:
        body["usage"] = anthropic_usage(r)
    return body


def openai_chunks(r: ModelResponse, model: str, n: int, *, usage: bool) -> list[Chunk]:
    """The chat.completion.chunk stream for ``r``; ``usage`` when the client asked include_usage."""
    base = {"id": f"chatcmpl-fake{n}", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None, content: bool = True) -> Chunk:
        return Chunk(_dumps(base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}), "", content)

    out = [chunk({"role": "assistant", "content": ""}, content=False)]
    out += [chunk({"content": w}) for w in words(r.content)]
    for i, c in enumerate(r.tool_calls):
        head = {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
        out.append(chunk({"tool_calls": [head]}))
        out += [
            chunk({"tool_calls": [{"index": i, "function": {"arguments": f}}]}) for f in fragments(_dumps(c.arguments))
        ]
    out.append(chunk({}, _OPENAI_FINISH.get(r.finish_reason, "stop"), content=False))
    if usage:
        out.append(Chunk(_dumps(base | {"choices": [], "usage": openai_usage(r)})))
    out.append(Chunk("[DONE]"))
    return out


def anthropic_chunks(r: ModelResponse, model: str, n: int, *, usage: bool) -> list[Chunk]:
    """The Messages event stream for ``r``: message_start, content blocks, message_delta, message_stop."""

    def event(kind: str, content: bool = False, **fields: Any) -> Chunk:
        return Chunk(_dumps({"type": kind, **fields}), kind, content)

    start_usage = anthropic_usage(r) | {"output_tokens": 1} if usage else {}
    message = {"id": f"msg_fake{n}", "type": "message", "role": "assistant", "model": model, "content": []}
    out = [event("message_start", message=message | {"stop_reason": None, "usage": start_usage}), event("ping")]
    index = 0
    if r.content:
        out.append(event("content_block_start", index=index, content_block={"type": "text", "text": ""}))
        out += [
            event("content_block_delta", True, index=index, delta={"type": "text_delta", "text": w})
            for w in words(r.content)
        ]
        out.append(event("content_block_stop", index=index))
        index += 1
    for c in r.tool_calls:
        block = {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}
        out.append(event("content_block_start", True, index=index, content_block=block))
        out += [
            event("content_block_delta", True, index=index, delta={"type": "input_json_delta", "partial_json": f})
            for f in fragments(_dumps(c.arguments))
        ]
        out.append(event("content_block_stop", index=index))
        index += 1
    delta = {"stop_reason": _ANTHROPIC_STOP.get(r.finish_reason, "end_turn"), "stop_sequence": None}
    out.append(event("message_delta", delta=delta, usage={"output_tokens": r.output_tokens} if usage else {}))
    out.append(event("message_stop"))
    return out


# --- errors -------------------------------------------------------------------------------

_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_denied", 404: "not_found"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_CONTEXT_MESSAGES = {
    OPENAI: "This model's maximum context length is 128000 tokens. However, your messages resulted in 250000 tokens.",
    ANTHROPIC: "prompt is too long: 250000 tokens > 200000 maximum",
}


def error_body(
    protocol: str, status: int, *, message: str = "", error_type: str = "", code: str = ""
) -> dict[str, Any]:
    """An error body in ``protocol``'s shape (OpenAI ``{"error": {...}}``, Anthropic ``{"type": "error"}``)."""
    if code == "context_length_exceeded" and not message:
        message = _CONTEXT_MESSAGES[protocol]
    message = message or f"fake-llm: HTTP {status}"
    if protocol == OPENAI:
        default = "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        err_type = error_type or _OPENAI_TYPES.get(status, default)
        code = code or ("rate_limit_exceeded" if status == 429 else "")
        return {"error": {"message": message, "type": err_type, "param": None, "code": code or None}}
    err_type = error_type or _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": err_type, "message": message}}


# --- HTTP/1.1 framing ---------------------------------------------------------------------


def http_head(status: int, headers: dict[str, str], *, chunked: bool = False) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Overloaded" if status == 529 else "Error"
    lines = [f"HTTP/1.1 {status} {reason}", "server: fake-llm"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if chunked:
        lines.append("transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


def abort(writer: asyncio.StreamWriter) -> None:
    """Drop the connection without ending the response (RST rather than a clean close)."""
    transport = writer.transport
    transport.abort()
