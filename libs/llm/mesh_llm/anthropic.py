"""The Anthropic Messages API over httpx (``POST {base_url}/v1/messages``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from mesh_llm._http import Deadlines, HTTPChat, loads_object
from mesh_llm.errors import ProviderError
from mesh_llm.model import Message, ModelRequest, ModelResponse, StreamEvent, Timeouts, ToolCall, ToolSpec

API_VERSION = "2023-06-01"
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


def to_anthropic_messages(messages: tuple[Message, ...] | list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """``(system, messages)`` in the Messages API shape.

    System messages move to the top-level ``system`` parameter; tool results become
    ``tool_result`` blocks of a user turn; consecutive turns of one role are merged, since
    the API requires user and assistant to alternate.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            if m.content:
                system.append(m.content)
            continue
        role = "assistant" if m.role == "assistant" else "user"
        blocks: list[dict[str, Any]] = []
        if m.role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id}
            if m.content:  # the API rejects empty text; an absent content means "no output"
                result["content"] = m.content
            blocks.append(result)
        else:
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            blocks.extend({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in m.tool_calls)
        if not blocks:  # an empty message: nothing to say, and empty content is rejected
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":
            # tool_result blocks must open the user turn that answers the tool_use turn.
            turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return "\n\n".join(system), turns


def to_anthropic_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """Tool specs with their JSON schema as ``input_schema``."""
    return [
        {
            "name": t.name,
            "description": t.description,
            "input_schema": t.parameters or {"type": "object", "properties": {}},
        }
        for t in tools
    ]


class AnthropicChat(HTTPChat):
    """A ``ChatModel`` over the Anthropic Messages API."""

    provider = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.anthropic.com",
        api_key: str = "",
        context_window: int = 200_000,
        timeouts: Timeouts | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            model,
            base_url=base_url,
            api_key=api_key,
            context_window=context_window,
            timeouts=timeouts,
            client=client,
        )

    def payload(self, request: ModelRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body for ``request``."""
        system, messages = to_anthropic_messages(request.messages)
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens, "messages": messages}
        if system:
            body["system"] = system
        if request.tools:
            body["tools"] = to_anthropic_tools(request.tools)
            if request.tool_choice == "required":
                body["tool_choice"] = {"type": "any"}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if stream:
            body["stream"] = True
        return body

    def _headers(self, *, stream: bool) -> dict[str, str]:
        headers = {"accept": "text/event-stream" if stream else "application/json", "anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    async def _open(self, request: ModelRequest, deadlines: Deadlines, *, stream: bool) -> httpx.Response:
        return await self.open(
            "/v1/messages", self.payload(request, stream=stream), self._headers(stream=stream), deadlines
        )

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """One non-streamed completion."""
        deadlines = Deadlines(self.timeouts)
        response = await self._open(request, deadlines, stream=False)
        deadlines.got_token = True  # headers of a non-streamed answer come with the answer
        try:
            raw = (await self.read_body(response, deadlines)).decode("utf-8", "replace")
        finally:
            await response.aclose()
        data = loads_object(raw)
        if data is None:
            raise self.malformed("body is not a JSON object", raw)
        if data.get("type") == "error":
            raise self._event_error(data)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise self.malformed("no content blocks", raw)
        text: list[str] = []
        calls: list[ToolCall] = []
        try:
            for block in blocks:
                if block["type"] == "text":
                    text.append(block["text"])
                elif block["type"] == "tool_use":
                    calls.append(self._tool_call(block["id"], block["name"], block.get("input")))
        except (KeyError, TypeError):
            raise self.malformed("unreadable content block", raw) from None
        return self._response(
            request, data.get("model"), "".join(text), tuple(calls), data.get("stop_reason"), data.get("usage")
        )

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Text deltas as they arrive; the last event carries the whole ``ModelResponse``."""
        deadlines = Deadlines(self.timeouts)
        response = await self._open(request, deadlines, stream=True)
        state = _StreamState()
        try:
            async for event in self.events(response, deadlines):
                data = loads_object(event.data)
                if data is None:
                    raise self.malformed(f"{event.event} event is not a JSON object", event.data)
                kind = data.get("type") or event.event
                if kind == "error":
                    raise self._event_error(data)
                try:
                    text = state.feed(kind, data)
                except (AttributeError, KeyError, TypeError, ValueError):
                    raise self.malformed(f"unreadable {kind} event", event.data) from None
                if text:
                    yield StreamEvent(text=text)
                if state.got_token:
                    deadlines.got_token = True
                if state.done:
                    break
            if not state.done:
                raise self.malformed("stream ended without message_stop")
        finally:
            await response.aclose()
        calls = []
        for _, block in sorted(state.blocks.items()):
            if block["type"] == "tool_use":
                raw = "".join(block["json"])
                args = loads_object(raw) if raw.strip() else block.get("input") or {}
                if args is None:
                    raise self.malformed(f"input of tool call {block['name']!r} is not a JSON object", raw)
                calls.append(self._tool_call(block["id"], block["name"], args))
        text = "".join(b["text"] for _, b in sorted(state.blocks.items()) if b["type"] == "text")
        yield StreamEvent(
            response=self._response(request, state.model, text, tuple(calls), state.stop_reason, state.usage)
        )

    # --- parsing ------------------------------------------------------------------------------

    def _tool_call(self, call_id: Any, name: Any, arguments: Any) -> ToolCall:
        if not isinstance(arguments, dict) or not name:
            raise self.malformed(f"tool_use block {name!r} without an input object")
        return ToolCall(str(call_id), str(name), arguments)

    def _response(
        self,
        request: ModelRequest,
        model: Any,
        content: str,
        calls: tuple[ToolCall, ...],
        stop_reason: Any,
        usage: Any,
    ) -> ModelResponse:
        usage = usage if isinstance(usage, dict) else {}
        cached = usage.get("cache_read_input_tokens") or 0
        reported = usage.get("input_tokens")
        if isinstance(reported, int):
            # Anthropic's input_tokens excludes what was read from or written to the prompt
            # cache; ModelResponse.input_tokens is the whole prompt, cached part included.
            reported += cached + (usage.get("cache_creation_input_tokens") or 0)
        produced = content + "".join(c.name + json.dumps(c.arguments) for c in calls)
        inp, out = self.usage_or_count(request, reported, usage.get("output_tokens"), produced)
        reason = _FINISH.get(str(stop_reason), "stop")
        if calls and reason == "stop":
            reason = "tool_calls"
        return ModelResponse(
            content=content,
            tool_calls=calls,
            input_tokens=inp,
            output_tokens=out,
            provider=self.provider,
            model=str(model or self.model),
            finish_reason=reason,
            cached_input_tokens=min(int(cached), inp),
        )

    def error_fields(self, body: Any) -> tuple[str, str, str]:
        """Anthropic errors: ``{"type": "error", "error": {"type", "message"}}``."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return "", "", ""
        return str(err.get("type") or ""), "", str(err.get("message") or "")

    def _event_error(self, data: dict[str, Any]) -> ProviderError:
        err_type, _, message = self.error_fields(data)
        return self.stream_error(err_type, message)


class _StreamState:
    """What a Messages stream has said so far: content blocks by index, usage, stop reason."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] = {}
        self.model: str | None = None
        self.stop_reason: str | None = None
        self.done = False
        self.got_token = False

    def feed(self, kind: str, data: dict[str, Any]) -> str:
        """Fold one event in; return its text delta."""
        if kind == "message_start":
            message = data["message"]
            self.model = message.get("model")
            self.usage.update(message.get("usage") or {})
        elif kind == "content_block_start":
            block = data["content_block"]
            self.blocks[data["index"]] = {
                "type": block["type"],
                "text": block.get("text", ""),
                "id": block.get("id"),
                "name": block.get("name"),
                "input": block.get("input"),
                "json": [],
            }
            if block["type"] == "tool_use":
                self.got_token = True
            elif block["type"] == "text" and block.get("text"):  # usually empty, but may open with text
                self.got_token = True
                return str(block["text"])
        elif kind == "content_block_delta":
            block, delta = self.blocks[data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
                self.got_token = self.got_token or bool(delta["text"])
                return str(delta["text"])
            if delta["type"] == "input_json_delta":
                block["json"].append(delta["partial_json"])
                self.got_token = True
            # thinking/signature deltas carry no answer text: ignored
        elif kind == "message_delta":
            self.stop_reason = (data.get("delta") or {}).get("stop_reason") or self.stop_reason
            # message_delta usage is cumulative: output_tokens (and, lately, input counts too)
            self.usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            self.done = True
        # ping, content_block_stop and unknown future events change nothing
        return ""
