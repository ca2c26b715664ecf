"""OpenAI-compatible chat completions over httpx (OpenAI, Azure, vLLM, Ollama, llama.cpp, LiteLLM).

Speaks ``POST {base_url}/chat/completions`` with ``base_url`` like ``http://host:port/v1``;
Azure-style deployments add their ``api-key`` header and ``api-version`` query through
``extra_headers`` / ``extra_query``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from mesh_llm._http import SECRET_NAME, Deadlines, HTTPChat, loads_object
from mesh_llm.errors import ProviderError
from mesh_llm.model import Message, ModelRequest, ModelResponse, StreamEvent, Timeouts, ToolCall, ToolSpec

_FINISH = {"stop": "stop", "tool_calls": "tool_calls", "function_call": "tool_calls", "length": "length"}


def to_openai_messages(messages: tuple[Message, ...] | list[Message]) -> list[dict[str, Any]]:
    """Our messages in the chat-completions shape (tool arguments as JSON strings)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            # No ``name`` here: it is not part of the tool message schema; the call id links it.
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
            continue
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            item["name"] = m.name
        if m.role == "assistant" and m.tool_calls:
            item["content"] = m.content or None  # the API's way of saying "only tool calls"
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in m.tool_calls
            ]
        out.append(item)
    return out


def to_openai_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """Tool specs as ``function`` tools (an empty schema becomes an argument-less object)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters or {"type": "object", "properties": {}},
            },
        }
        for t in tools
    ]


class OpenAIChat(HTTPChat):
    """A ``ChatModel`` over an OpenAI-compatible ``/chat/completions`` endpoint."""

    provider = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str = "",
        context_window: int = 128_000,
        timeouts: Timeouts | None = None,
        client: httpx.AsyncClient | None = None,
        extra_headers: dict[str, str] | None = None,
        extra_query: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            model,
            base_url=base_url,
            api_key=api_key,
            context_window=context_window,
            timeouts=timeouts,
            client=client,
        )
        self._extra_headers = dict(extra_headers or {})
        self._extra_query = dict(extra_query or {})
        # Azure's api-key header (or a signed query) is as secret as the bearer token.
        self._secrets += [
            v for k, v in (self._extra_headers | self._extra_query).items() if v and SECRET_NAME.search(k)
        ]

    def payload(self, request: ModelRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body for ``request``."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(request.messages),
            "max_tokens": request.max_tokens,
        }
        if request.tools:
            body["tools"] = to_openai_tools(request.tools)
            if request.tool_choice == "required":
                body["tool_choice"] = "required"
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.response_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": f"{request.agent or 'answer'}_output", "schema": request.response_schema},
            }
        if stream:
            # Without this the stream carries no usage at all and tokens go unbilled.
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _headers(self, *, stream: bool) -> dict[str, str]:
        headers = {"accept": "text/event-stream" if stream else "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers | self._extra_headers

    async def _open(self, request: ModelRequest, deadlines: Deadlines, *, stream: bool) -> httpx.Response:
        return await self.open(
            "/chat/completions",
            self.payload(request, stream=stream),
            self._headers(stream=stream),
            deadlines,
            params=self._extra_query or None,
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
        if isinstance(data.get("error"), dict):  # some proxies answer errors with 200
            raise self._chunk_error(data["error"])
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self.malformed("no choices", raw)
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise self.malformed("choice without a message", raw)
        try:
            calls = tuple(
                self._tool_call(i, c.get("id"), c["function"].get("name"), c["function"].get("arguments"))
                for i, c in enumerate(message.get("tool_calls") or [])
            )
        except (AttributeError, KeyError, TypeError):
            raise self.malformed("unreadable tool_calls", raw) from None
        content = _text(message.get("content"))
        return self._response(
            request, data.get("model"), content, calls, choices[0].get("finish_reason"), data.get("usage")
        )

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Text deltas as they arrive; the last event carries the whole ``ModelResponse``."""
        deadlines = Deadlines(self.timeouts)
        response = await self._open(request, deadlines, stream=True)
        try:
            state = _StreamState()
            async for event in self.events(response, deadlines):
                if event.data.strip() == "[DONE]":
                    state.done = True
                    break
                chunk = loads_object(event.data)
                if chunk is None:
                    raise self.malformed("stream chunk is not a JSON object", event.data)
                if isinstance(chunk.get("error"), dict):
                    raise self._chunk_error(chunk["error"])
                try:
                    text = self._feed(state, chunk)
                except (AttributeError, KeyError, TypeError):
                    raise self.malformed("unreadable stream chunk", event.data) from None
                if text:
                    yield StreamEvent(text=text)
                if state.got_token:
                    deadlines.got_token = True
            if not state.done:
                raise self.malformed("stream ended without [DONE]")
        finally:
            await response.aclose()
        calls = tuple(
            self._tool_call(i, f["id"], f["name"], "".join(f["arguments"])) for i, f in sorted(state.tools.items())
        )
        yield StreamEvent(
            response=self._response(request, state.model, "".join(state.text), calls, state.finish, state.usage)
        )

    # --- parsing ------------------------------------------------------------------------------

    def _feed(self, state: _StreamState, chunk: dict[str, Any]) -> str:
        """Fold one chunk into ``state``; return its text delta."""
        if chunk.get("model"):
            state.model = chunk["model"]
        if isinstance(chunk.get("usage"), dict):  # the include_usage chunk (choices: [])
            state.usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text += _text(delta.get("content"))
            for frag in delta.get("tool_calls") or []:
                # Fragments of one call share an ``index``; id and name come once, arguments piecemeal.
                slot = state.tools.setdefault(frag.get("index", 0), {"id": None, "name": "", "arguments": []})
                slot["id"] = slot["id"] or frag.get("id")
                fn = frag.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"].append(fn.get("arguments") or "")
                state.got_token = True
            if choice.get("finish_reason"):
                state.finish = choice["finish_reason"]
        if text:
            state.text.append(text)
            state.got_token = True
        return text

    def _tool_call(self, index: int, call_id: Any, name: Any, arguments: Any) -> ToolCall:
        if isinstance(arguments, dict):  # a few compatible servers send the object itself
            args: dict[str, Any] | None = arguments
        elif arguments is None or isinstance(arguments, str):
            raw = arguments or ""
            args = loads_object(raw) if raw.strip() else {}
        else:
            args, raw = None, repr(arguments)
        if args is None:
            raise self.malformed(f"arguments of tool call {name!r} are not a JSON object", raw)
        if not name:
            raise self.malformed("tool call without a name")
        return ToolCall(str(call_id or f"call_{index}"), str(name), args)

    def _response(
        self,
        request: ModelRequest,
        model: Any,
        content: str,
        calls: tuple[ToolCall, ...],
        finish: Any,
        usage: Any,
    ) -> ModelResponse:
        usage = usage if isinstance(usage, dict) else {}
        produced = content + "".join(c.name + json.dumps(c.arguments) for c in calls)
        inp, out = self.usage_or_count(request, usage.get("prompt_tokens"), usage.get("completion_tokens"), produced)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        reason = _FINISH.get(str(finish), "stop")
        if calls and reason == "stop":  # Ollama and others say "stop" even when they called tools
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
        """OpenAI errors: ``{"error": {"message", "type", "code"}}`` (a bare string from some proxies)."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, str):
            return "", "", err
        if not isinstance(err, dict):
            return "", "", ""
        return str(err.get("type") or ""), str(err.get("code") or ""), str(err.get("message") or "")

    def _chunk_error(self, err: dict[str, Any]) -> ProviderError:
        return self.stream_error(str(err.get("type") or err.get("code") or ""), str(err.get("message") or ""))


class _StreamState:
    """What a stream has said so far."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.done = False
        self.got_token = False


def _text(content: Any) -> str:
    """Message content as text: a string, null, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
