"""A local HTTP server speaking the OpenAI and Anthropic chat protocols, with faults on demand.

In-process::

    async with FakeLLMServer() as srv:
        model = OpenAIChat("gpt-x", base_url=srv.openai_base)
        srv.push(Fault.http(429, retry_after="2"))   # the next request gets a 429
        srv.default = Fault.http(503)                # ... and every one after it a 503

As a process next to a real mesh (e.g. a primary-provider outage)::

    python -m mesh_testing.fake_llm --port 0 --fail-status 503 --fail-every 1 --port-file /tmp/p

The answers come from a "brain" (``ModelRequest -> ModelResponse``, sync or async), by
default the deterministic ``ScriptedModel``, so a mesh pointed here behaves like the
scripted one. The HTTP side is a deliberately small HTTP/1.1 on ``asyncio.start_server``:
keep-alive, ``Content-Length`` requests, ``Content-Length`` or chunked responses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from mesh_llm.errors import ProviderError
from mesh_llm.model import ModelRequest, ModelResponse
from mesh_llm.scripted import ScriptedModel
from mesh_testing.errors import TestingError
from mesh_testing.fake_llm_faults import Fault, RecordedRequest
from mesh_testing.fake_llm_wire import (
    ANTHROPIC,
    OPENAI,
    Chunk,
    WireError,
    abort,
    anthropic_body,
    anthropic_chunks,
    error_body,
    http_head,
    openai_body,
    openai_chunks,
    to_model_request,
    write_chunk,
)

__all__ = ["FakeLLMServer", "Fault", "RecordedRequest", "main"]

Brain = Callable[[ModelRequest], ModelResponse | Awaitable[ModelResponse]]
ROUTES = {"/v1/chat/completions": OPENAI, "/v1/messages": ANTHROPIC}
MAX_BODY = 32 * 1024 * 1024


class _Closed(TestingError):
    """The client went away (or we hung up on purpose): stop serving this connection."""


class FakeLLMServer:
    """An in-process fake model server; see the module docstring."""

    def __init__(
        self,
        brain: Brain | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_delay_s: float = 0.0,
        first_token_delay_s: float = 0.0,
        api_key: str | None = None,
        report_model: str | None = None,
    ) -> None:
        self.brain: Brain = brain or ScriptedModel().complete
        self.host, self.port = host, port
        self.token_delay_s = token_delay_s
        """Pause between streamed content chunks."""
        self.first_token_delay_s = first_token_delay_s
        """Normal latency before the first content chunk (or the non-streamed body)."""
        self.api_key = api_key
        """When set, a request without this key gets a 401 (which, like some real servers, echoes the key)."""
        self.report_model = report_model
        """The model name answers report (default: the requested one)."""
        self.omit_usage = False
        """Answer without usage, as some OpenAI-compatible servers do."""
        self.default: Fault | None = None
        """The fault for every request once the queue is empty (``None``: answer normally)."""
        self.fail_every = 0
        self.fail_fault: Fault | None = None
        """With ``fail_every = n``, every n-th request (after the queue) gets ``fail_fault``."""
        self.requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._stopping = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> FakeLLMServer:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop every open connection (stalled ones included)."""
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server, self._stopping = None, False

    async def __aenter__(self) -> FakeLLMServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base(self) -> str:
        return self.url

    # --- faults and records -------------------------------------------------------------------

    def push(self, *faults: Fault) -> None:
        """Queue faults for the next requests, in order."""
        self._faults.extend(faults)

    def timings(self) -> list[tuple[float, float | None]]:
        """``(received_at, first_chunk_at)`` per request, in arrival order (monotonic seconds)."""
        return [(r.received_at, r.first_chunk_at) for r in self.requests]

    def _next_fault(self) -> Fault | None:
        self._count += 1
        if self._faults:
            return self._faults.popleft()
        if self.fail_every and self.fail_fault and self._count % self.fail_every == 0:
            return self.fail_fault
        return self.default

    @property
    def open_connections(self) -> int:
        """Client connections the server holds open now (keep-alive ones included)."""
        return len(self._tasks)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            # stop() cancels us. Ending normally matters: asyncio (3.11) logs a traceback for
            # a start_server handler task that ends cancelled.
            if not self._stopping:
                raise
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open."""
        line = await reader.readline()
        if not line:
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY:
            await self._send_json(writer, 413, {"error": {"message": "body too large"}})
            return False
        raw = await reader.readexactly(length) if length else b""
        received = time.monotonic()
        path = target.split("?", 1)[0]
        keep = headers.get("connection", "").lower() != "close"
        if method == "GET" and path == "/health":
            await self._send_json(writer, 200, {"ok": True})
            return keep
        protocol = ROUTES.get(path)
        if protocol is None or method != "POST":
            await self._send_json(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return keep
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        stream = isinstance(body, dict) and body.get("stream") is True
        record = RecordedRequest(method, target, headers, body, protocol, stream, received)
        self.requests.append(record)
        await self._answer(record, reader, writer)
        return keep

    async def _answer(self, rec: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not isinstance(rec.body, dict):
            await self._send_json(writer, 400, error_body(rec.protocol, 400, message="body is not a JSON object"))
            return
        if self.api_key is not None and _presented_key(rec) != self.api_key:
            message = f"Incorrect API key provided: {_presented_key(rec)}"
            await self._send_json(writer, 401, error_body(rec.protocol, 401, message=message))
            return
        fault = self._next_fault()
        rec.fault = fault.kind if fault else None
        if fault and fault.kind == "slow_first_token":
            await self._pause(reader, fault.seconds, rec)
        if fault and fault.kind == "status":
            await self._send_fault_status(writer, rec.protocol, fault)
            return
        try:
            request = to_model_request(rec.protocol, rec.body)
            answer = self.brain(request)
            response = await answer if inspect.isawaitable(answer) else answer
        except WireError as exc:
            await self._send_json(writer, 400, error_body(rec.protocol, 400, message=str(exc)))
            return
        except ProviderError as exc:  # the brain's own outage, e.g. the scripted "#provider-down"
            status = exc.status or 500
            extra = {"retry-after": f"{exc.retry_after:g}"} if exc.retry_after is not None else {}
            await self._send_json(writer, status, error_body(rec.protocol, status, message=str(exc)), extra)
            return
        except Exception as exc:  # noqa: BLE001 - a broken brain is a 500, like a real server's bug
            message = f"brain failed: {type(exc).__name__}: {exc}"
            await self._send_json(writer, 500, error_body(rec.protocol, 500, message=message))
            return
        model = self.report_model or str(rec.body.get("model") or "fake")
        n = len(self.requests)
        if rec.stream:
            await self._stream(rec, reader, writer, response, model, n, fault)
        else:
            await self._whole(rec, reader, writer, response, model, n, fault)

    async def _whole(
        self,
        rec: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: ModelResponse,
        model: str,
        n: int,
        fault: Fault | None,
    ) -> None:
        build = openai_body if rec.protocol == OPENAI else anthropic_body
        body = json.dumps(build(response, model, n, usage=not self.omit_usage), ensure_ascii=False).encode()
        kind = fault.kind if fault else None
        if kind == "malformed":
            body = body[: len(body) // 2]  # valid start, cut mid-value: not JSON
        elif kind == "stream_error" and fault is not None:  # some proxies send errors with a 200
            body = json.dumps(
                error_body(rec.protocol, 500, message=fault.message, error_type=fault.error_type)
            ).encode()
        await self._pause(reader, self.first_token_delay_s, rec)
        head = http_head(200, {"content-type": "application/json", "content-length": str(len(body))})
        if kind in ("stall", "disconnect"):
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            if kind == "disconnect":
                abort(writer)
                raise _Closed
            await self._pause(reader, fault.seconds if fault else 0, rec)
            writer.write(body[len(body) // 2 :])
        else:
            writer.write(head + body)
        await writer.drain()
        rec.first_chunk_at = rec.first_chunk_at or time.monotonic()

    async def _stream(
        self,
        rec: RecordedRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: ModelResponse,
        model: str,
        n: int,
        fault: Fault | None,
    ) -> None:
        if rec.protocol == OPENAI:
            wants_usage = bool((rec.body.get("stream_options") or {}).get("include_usage"))
            chunks = openai_chunks(response, model, n, usage=wants_usage and not self.omit_usage)
        else:
            chunks = anthropic_chunks(response, model, n, usage=not self.omit_usage)
        writer.write(http_head(200, {"content-type": "text/event-stream", "cache-control": "no-cache"}, chunked=True))
        await writer.drain()
        sent = 0  # content chunks written so far
        total = sum(c.content for c in chunks)
        # A short answer still gets its fault: at the end of the content if it has fewer chunks.
        at = min(fault.after_chunks, total) if fault else -1
        for chunk in chunks:
            if chunk.content:
                delay = self.first_token_delay_s if sent == 0 else self.token_delay_s
                await self._pause(reader, delay, rec)
            if fault and sent == at and (chunk.content or sent == total):
                ended = await self._misbehave(rec, reader, writer, fault)
                fault = None
                if ended:
                    return
            await write_chunk(writer, chunk.encode())
            if chunk.content:
                sent += 1
                rec.first_chunk_at = rec.first_chunk_at or time.monotonic()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _misbehave(
        self, rec: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: Fault
    ) -> bool:
        """Apply a mid-stream fault; return whether the stream is over."""
        if fault.kind == "stall":
            await self._pause(reader, fault.seconds, rec)  # silent, but the socket stays open
        elif fault.kind == "disconnect":
            abort(writer)
            raise _Closed
        elif fault.kind == "malformed":
            await write_chunk(writer, Chunk('{"choices": [{"delta": {"content": "brok').encode())
        elif fault.kind == "truncate":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        elif fault.kind == "stream_error":
            err = error_body(rec.protocol, 500, message=fault.message, error_type=fault.error_type)
            await write_chunk(writer, Chunk(json.dumps(err), "error" if rec.protocol == ANTHROPIC else "").encode())
            writer.write(b"0\r\n\r\n")  # a real server ends the stream after an error event
            await writer.drain()
            return True
        return False

    async def _pause(self, reader: asyncio.StreamReader, seconds: float, rec: RecordedRequest) -> None:
        """Wait ``seconds``, noticing (and recording) a client that hangs up meanwhile."""
        if seconds <= 0:
            return
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    data = await reader.read(1)  # a client never sends while awaiting its answer
            except TimeoutError:
                return
            if not data:
                rec.client_closed_at = time.monotonic()
                raise _Closed

    async def _send_fault_status(self, writer: asyncio.StreamWriter, protocol: str, fault: Fault) -> None:
        if fault.body is None:
            body: Any = error_body(
                protocol, fault.status, message=fault.message, error_type=fault.error_type, code=fault.code
            )
        else:
            body = fault.body
        extra = dict(fault.headers)
        if fault.retry_after is not None:
            extra["retry-after"] = fault.retry_after
        await self._send_json(writer, fault.status, body, extra)

    @staticmethod
    async def _send_json(
        writer: asyncio.StreamWriter, status: int, body: Any, extra: dict[str, str] | None = None
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", "content-length": str(len(data))} | (extra or {})
        writer.write(http_head(status, headers) + data)
        await writer.drain()


def _presented_key(rec: RecordedRequest) -> str:
    if rec.protocol == OPENAI:
        return rec.headers.get("authorization", "").removeprefix("Bearer ")
    return rec.headers.get("x-api-key", "")


# --- CLI ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m mesh_testing.fake_llm",
        description="A fake OpenAI/Anthropic-compatible model server answering like the scripted model.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the chosen port number here once listening")
    parser.add_argument("--fail-status", type=int, help="answer failing requests with this HTTP status")
    parser.add_argument("--fail-every", type=int, default=1, help="with --fail-status: every N-th request fails")
    parser.add_argument("--retry-after", help="Retry-After header value sent with --fail-status")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="pause between streamed chunks")
    parser.add_argument("--first-token-ms", type=float, default=0.0, help="latency before the first chunk")
    parser.add_argument("--api-key", help="require this key (401 otherwise)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    if args.fail_status is not None and not 100 <= args.fail_status <= 599:
        parser.error(f"--fail-status must be an HTTP status (100-599), got {args.fail_status}")
    if args.fail_every < 1:
        parser.error(f"--fail-every must be at least 1, got {args.fail_every}")
    if args.token_delay_ms < 0 or args.first_token_ms < 0:
        parser.error("delays must not be negative")
    return args


async def _serve(args: argparse.Namespace) -> None:
    srv = FakeLLMServer(
        host=args.host,
        port=args.port,
        token_delay_s=args.token_delay_ms / 1000,
        first_token_delay_s=args.first_token_ms / 1000,
        api_key=args.api_key,
    )
    if args.fail_status is not None:
        srv.fail_every = args.fail_every
        srv.fail_fault = Fault.http(args.fail_status, retry_after=args.retry_after)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with srv:
        if args.port_file:
            tmp = f"{args.port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{srv.port}\n")
            os.replace(tmp, args.port_file)  # readers never see a half-written file
        print(f"fake-llm listening on {srv.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT."""
    args = _parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:  # e.g. the port is taken: one line, no traceback
        print(f"fake-llm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
