"""Tools from MCP servers, mounted into the tool-executor over the stdio transport.

An operator lists MCP servers in a JSON file; each is started as a child process and its tools
appear in the registry as ``<server>__<tool>``. The mesh stays in charge of them:

- Risk, approval, timeouts and rate limits come from the operator's config only. A server's
  tool annotations (``readOnlyHint`` ...) are reported but never lower a risk class: they are
  the server describing itself, and a compromised or careless server would describe itself
  as harmless.
- Arguments are validated against the tool's input schema here (and by the tool-executor before
  its policy), before anything reaches the server, so a bad call is refused with a path and a
  reason the agent can act on. A schema that does not say whether it takes other properties is
  read as closed (``arguments.py``): an argument the tool does not define never reaches it.
- A server that fails to start is logged and skipped; the rest of the mesh keeps working. A
  server that dies is restarted once on the next call to it. A call that was in flight when it
  died is not retried: a write tool may have run, and the mesh promises at most once.

The SDK's stdio client and session are async context managers holding anyio task groups and
cancel scopes, which must be entered and exited by the same task. Each server therefore gets one
long-lived owner task that enters both, waits for "stop" or "the child's stdout ended", and exits
them. Calls run in the caller's own task on the open session (a request only uses its own cancel
scope, entered and left in that task), so calls to one server run concurrently and a caller's
timeout cancels only its call. The SDK's shutdown closes the child's stdin, waits, then kills its
process group, and reaps it: no zombies.

A child's stderr goes through a pipe into this process's log (debug level) and its last lines
are kept, so "the server exited" comes with the server's own last words instead of tracebacks
on the service's stdout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import jsonschema
import mcp.types as types
from jsonschema.protocols import Validator
from mcp import ClientSession, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client

from mesh_tool_executor import arguments as schemas
from mesh_tool_executor.errors import ToolExecutorError
from mesh_tool_executor.tools import Risk

log = logging.getLogger("mesh.tool-executor.mcp")

RISKS = ("read", "write", "external")
SERVER_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
# What model providers accept as a tool name; a mounted name outside it could not be offered.
MOUNTED_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CLIENT_INFO = types.Implementation(name="agentmesh-tool-executor", version="1.0")

_SERVER_KEYS = frozenset({"name", "command", "args", "env", "cwd", "tools", "default_risk", "startup_timeout_s"})
_MAX_TIMEOUT_S = 600.0
_STDERR_LINES = 20
_CLOSE_WAIT_S = 15.0  # the SDK's shutdown is bounded (about 6.5 s); this only guards against a bug
_LIST_PAGES = 100  # a server paging forever must not stall startup forever


class McpToolError(ToolExecutorError):
    """A mounted tool call that failed or was refused; the message is one line for the agent."""


def _check_policy(tool: str, policy: object) -> dict[str, Any]:
    where = f"tools.{tool}"
    if not isinstance(policy, dict):
        raise ValueError(f"{where}: must be an object")
    for key, value in policy.items():
        if key == "risk":
            if value not in RISKS:
                raise ValueError(f"{where}.risk: must be one of {', '.join(RISKS)}, got {value!r}")
        elif key == "needs_approval":
            if not isinstance(value, bool):
                raise ValueError(f"{where}.needs_approval: must be true or false, got {value!r}")
        elif key == "timeout_s":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= _MAX_TIMEOUT_S:
                raise ValueError(f"{where}.timeout_s: must be a number in (0, {_MAX_TIMEOUT_S:g}], got {value!r}")
        elif key == "rate_per_min":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.rate_per_min: must be a positive integer, got {value!r}")
        else:
            raise ValueError(f"{where}: unknown key {key!r} (risk, needs_approval, timeout_s, rate_per_min)")
    return dict(policy)


@dataclass(frozen=True)
class McpServerConfig:
    """One MCP server to run over stdio. Invalid values raise ValueError naming the field."""

    name: str  # mounted tool names become f"{name}__{tool}"
    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # merged over the SDK's minimal safe environment
    cwd: str | None = None
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-tool policy overrides
    default_risk: Risk = "external"  # for tools not listed: an unknown server is assumed to reach out
    startup_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SERVER_NAME.match(self.name) or "__" in self.name:
            raise ValueError(f"name: must match [a-z0-9_]{{1,32}} without '__', got {self.name!r}")
        if not isinstance(self.command, str) or not self.command.strip():
            raise ValueError("command: must be a non-empty string")
        if not isinstance(self.args, tuple) or not all(isinstance(a, str) for a in self.args):
            raise ValueError("args: must be a list of strings")
        if not isinstance(self.env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
        ):
            raise ValueError("env: must be an object of string values")
        if self.cwd is not None and (not isinstance(self.cwd, str) or not self.cwd):
            raise ValueError("cwd: must be a non-empty string or null")
        if not isinstance(self.tools, dict):
            raise ValueError("tools: must be an object of tool name -> policy")
        for tool, policy in self.tools.items():
            _check_policy(tool, policy)
        if self.default_risk not in RISKS:
            raise ValueError(f"default_risk: must be one of {', '.join(RISKS)}, got {self.default_risk!r}")
        timeout = self.startup_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= _MAX_TIMEOUT_S:
            raise ValueError(f"startup_timeout_s: must be a number in (0, {_MAX_TIMEOUT_S:g}], got {timeout!r}")


def load_config(path: str | Path) -> list[McpServerConfig]:
    """Read ``{"servers": [{...}, ...]}``. A relative ``cwd`` is taken from the file's directory.

    Any problem is a ValueError with one line naming the file and the field, e.g.
    ``mcp.json: servers[0].tools.set_setting.risk: must be one of read, write, external``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"servers"} or not isinstance(data["servers"], list):
        raise ValueError(f'{path}: must be an object with exactly one key, "servers", holding a list')
    configs: list[McpServerConfig] = []
    for i, raw in enumerate(data["servers"]):
        where = f"{path}: servers[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = sorted(set(raw) - _SERVER_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_SERVER_KEYS))})")
        for required in ("name", "command"):
            if required not in raw:
                raise ValueError(f"{where}.{required}: required")
        values = dict(raw)
        if "args" in values:
            if not isinstance(values["args"], list):
                raise ValueError(f"{where}.args: must be a list of strings")
            values["args"] = tuple(values["args"])
        cwd = values.get("cwd")
        if isinstance(cwd, str) and cwd and not Path(cwd).is_absolute():
            values["cwd"] = str(path.parent / cwd)
        try:
            config = McpServerConfig(**values)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
        if any(c.name == config.name for c in configs):
            raise ValueError(f"{where}.name: {config.name!r} is used twice")
        configs.append(config)
    return configs


@dataclass(frozen=True)
class MountedTool:
    name: str  # "<server>__<tool>"
    server: str
    remote_name: str
    description: str
    input_schema: dict[str, Any]  # the MCP tool's JSON schema
    policy: dict[str, Any]  # the config's override dict for this tool (may be empty)
    risk: Risk = "external"  # policy["risk"] or the server's default_risk: config decides, never the server
    annotations: dict[str, Any] = field(default_factory=dict)  # the server's hints (readOnlyHint ...), reported only


class _StartError(ToolExecutorError):
    """A server did not come up; the message is the reason kept in McpMount.errors."""


class _EofWatch:
    """The transport's read stream, noticing when it ends: the child exited or closed stdout.

    The SDK's session keeps running when the child dies while idle; this is how the owner task
    learns of it without a call having to fail first. It forwards the ``ReadStream`` protocol.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.eof = anyio.Event()

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.eof.set()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _EofWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _EofWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        # e.g. ``last_context``, which the dispatcher looks up duck-typed.
        return getattr(self._inner, name)


def _leaf(exc: BaseException) -> BaseException:
    # anyio task groups wrap failures in exception groups; the first leaf is the cause.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Server:
    """One MCP server process and the owner task that holds its session open."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self.session: ClientSession | None = None
        self.stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self.last_error: str | None = None
        self.closing = False
        self.tools: list[types.Tool] = []  # as listed at the first start: what is mounted
        self._owner: asyncio.Task[None] | None = None
        self._stop: anyio.Event | None = None
        self._watch: _EofWatch | None = None
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.session is not None and self._watch is not None and not self._watch.eof.is_set()

    async def start(self) -> list[types.Tool]:
        """Spawn, initialize, list tools. _StartError (with the child's last stderr) on failure."""
        if self.closing:
            raise _StartError("shut down")
        ready: asyncio.Future[list[types.Tool]] = asyncio.get_running_loop().create_future()
        # One event for the server's whole life, never replaced: a stop requested while a
        # restart is under way still reaches the new owner task.
        if self._stop is None:
            self._stop = anyio.Event()
        self._owner = asyncio.create_task(self._own(ready), name=f"mcp-server-{self.config.name}")
        # Shielded: a cancelled caller must not cancel the future the owner task settles.
        return await asyncio.shield(ready)

    async def session_for_call(self) -> ClientSession:
        """The live session, restarting a dead server once for this call."""
        if self.alive and self.session is not None:
            return self.session
        async with self._lock:
            if self.alive and self.session is not None:
                return self.session
            if self.closing:
                raise McpToolError(f"MCP server {self.config.name} is shut down")
            await self._join()
            log.warning("restarting MCP server %s (%s)", self.config.name, self.last_error or "not running")
            known = {t.name for t in self.tools}
            try:
                tools = await self.start()
            except _StartError as exc:
                raise McpToolError(f"MCP server {self.config.name} is down and did not restart: {exc}") from None
            if {t.name for t in tools} != known:
                log.warning(
                    "MCP server %s offers different tools after a restart; keeping the mounted set", self.config.name
                )
            assert self.session is not None
            return self.session

    async def close(self) -> None:
        self.closing = True
        if self._stop is not None:
            self._stop.set()
        # Under the lock: a restart in progress finishes first, so its owner is the one joined.
        async with self._lock:
            await self._join()

    async def _join(self) -> None:
        owner, self._owner = self._owner, None
        if owner is None:
            return
        done, _ = await asyncio.wait({owner}, timeout=_CLOSE_WAIT_S)
        if not done:
            log.error("MCP server %s did not shut down in %ss; cancelling its task", self.config.name, _CLOSE_WAIT_S)
            owner.cancel()
            with suppress(asyncio.CancelledError):
                await owner

    async def _own(self, ready: asyncio.Future[list[types.Tool]]) -> None:
        """Hold the stdio client and session open until stop() or the child's exit."""
        config = self.config
        params = StdioServerParameters(
            command=config.command, args=list(config.args), env=dict(config.env) or None, cwd=config.cwd
        )
        errlog: TextIO | None = None
        pump: asyncio.Task[None] | None = None
        error: BaseException | None = None
        started = False
        try:
            read_fd, write_fd = os.pipe()
            errlog = os.fdopen(write_fd, "w", encoding="utf-8", errors="replace")
            pump = asyncio.create_task(self._pump(read_fd), name=f"mcp-stderr-{config.name}")
            async with stdio_client(params, errlog=errlog) as (read, write):
                # The child has its own copy now; ours would keep the pipe open after it exits.
                errlog.close()
                self._watch = _EofWatch(read)
                async with ClientSession(self._watch, write, client_info=CLIENT_INFO) as session:
                    with anyio.fail_after(config.startup_timeout_s):
                        await session.initialize()
                        tools = await self._list_tools(session)
                    self.session = session
                    self.last_error = None
                    started = True
                    ready.set_result(tools)
                    await self._wait_stop_or_eof()
        except Exception as exc:  # noqa: BLE001 - whatever the child does is reported, never fatal here
            error = _leaf(exc)
        finally:
            self.session = None
            if errlog is not None:
                errlog.close()
            if pump is not None:
                # The pipe ends when the child (and anything it spawned) is gone; the last lines
                # of a crash arrive just before that.
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pump), 1.0)
                pump.cancel()
                with suppress(asyncio.CancelledError):
                    await pump
            # In the finally: even a cancelled owner must not leave start() waiting forever.
            if not started:
                self.last_error = self._describe(error, startup=True)
                if not ready.done():
                    ready.set_exception(_StartError(self.last_error))
            elif not self.closing:
                self.last_error = self._describe(error, startup=False)
                log.warning("MCP server %s stopped: %s", config.name, self.last_error)

    async def _wait_stop_or_eof(self) -> None:
        assert self._stop is not None and self._watch is not None
        async with anyio.create_task_group() as tg:

            async def wait(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait, self._stop)
            tg.start_soon(wait, self._watch.eof)

    @staticmethod
    async def _list_tools(session: ClientSession) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(_LIST_PAGES):
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def _pump(self, fd: int) -> None:
        """Child stderr -> debug log, keeping the last lines for error messages."""
        pipe = os.fdopen(fd, "rb", buffering=0)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            raise
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the reader's limit: dropped, keep reading
                    continue
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self.stderr.append(text[:500])
                    log.debug("mcp %s stderr: %s", self.config.name, text)
        finally:
            transport.close()

    def _describe(self, error: BaseException | None, *, startup: bool) -> str:
        config = self.config
        if isinstance(error, TimeoutError):  # before OSError, of which it is a subclass
            reason = f"no answer to initialize within {config.startup_timeout_s:g}s"
        elif isinstance(error, FileNotFoundError | PermissionError):
            reason = f"cannot run {config.command!r}: {error.strerror}"
        elif isinstance(error, OSError):
            reason = f"cannot start {config.command!r}: {error}"
        elif error is None or (isinstance(error, MCPError) and error.code == types.CONNECTION_CLOSED):
            reason = "exited during startup" if startup else "exited"
        else:
            reason = f"{type(error).__name__}: {error}"
        tail = " | ".join(list(self.stderr)[-3:])
        return f"{reason}; stderr: {tail}" if tail else reason


def _annotations(tool: types.Tool) -> dict[str, Any]:
    if tool.annotations is None:
        return {}
    return tool.annotations.model_dump(by_alias=True, exclude_none=True)


def _result_text(result: types.CallToolResult) -> str:
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.EmbeddedResource):
            text = getattr(block.resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[binary resource {block.resource.uri} omitted]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{block.type} content omitted]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


class McpMount:
    """The MCP servers of one tool-executor and the tools they contribute."""

    def __init__(self, configs: Sequence[McpServerConfig]) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"MCP server names must be unique: {names}")
        self._servers = {c.name: _Server(c) for c in configs}
        self._tools: dict[str, MountedTool] = {}
        self._validators: dict[str, Validator] = {}
        self.errors: dict[str, str] = {}  # server name -> why it is not mounted (or last stopped)
        self.skipped: dict[str, str] = {}  # mounted tool name -> why it was left out

    async def start(self) -> None:
        """Start every server concurrently; one that fails is logged and left out."""
        servers = list(self._servers.values())
        results = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
        for server, result in zip(servers, results, strict=True):
            name = server.config.name
            if isinstance(result, _StartError):
                self.errors[name] = str(result)
                log.warning("MCP server %s not mounted: %s", name, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._mount(server, result)
                log.info("MCP server %s mounted: %d tools", name, sum(t.server == name for t in self._tools.values()))

    def _mount(self, server: _Server, tools: list[types.Tool]) -> None:
        config = server.config
        server.tools = tools
        offered = {t.name for t in tools}
        for missing in sorted(set(config.tools) - offered):
            log.warning("MCP server %s: policy for %r, which it does not offer", config.name, missing)
        for tool in tools:
            name = f"{config.name}__{tool.name}"
            if not MOUNTED_NAME.match(name):
                self.skipped[name] = "name is not [A-Za-z0-9_-]{1,64}"
            elif name in self._tools:
                self.skipped[name] = "offered twice"
            else:
                try:
                    check = schemas.validator(tool.input_schema)
                except jsonschema.SchemaError as exc:
                    self.skipped[name] = f"invalid input schema: {exc.message}"
                else:
                    policy = dict(config.tools.get(tool.name, {}))
                    self._validators[name] = check
                    self._tools[name] = MountedTool(
                        name=name,
                        server=config.name,
                        remote_name=tool.name,
                        description=tool.description or "",
                        input_schema=dict(check.schema),  # closed: what is enforced is what is offered
                        policy=policy,
                        risk=policy.get("risk", config.default_risk),
                        annotations=_annotations(tool),
                    )
                    continue
            log.warning("MCP tool %s not mounted: %s", name, self.skipped[name])

    def tools(self) -> list[MountedTool]:
        return list(self._tools.values())

    def alive(self, server: str) -> bool:
        """Whether the server's process is up with an open session (for health and tests)."""
        return server in self._servers and self._servers[server].alive

    def validate(self, name: str, arguments: Mapping[str, Any]) -> None:
        """McpToolError("invalid arguments for X: <path>: <msg>") unless the arguments fit the
        tool's schema, read closed (``schemas.closed``: an argument it does not define is refused)."""
        if name not in self._tools:
            raise McpToolError(f"unknown MCP tool {name}")
        why = schemas.problem(name, self._validators[name], arguments)
        if why is not None:
            raise McpToolError(why)

    async def call(self, name: str, arguments: dict[str, Any], timeout_s: float) -> str:
        """Call a mounted tool; its text content, or McpToolError."""
        self.validate(name, arguments)
        tool = self._tools[name]
        server = self._servers[tool.server]
        session = await server.session_for_call()
        try:
            # The SDK's own timeout also tells the server to stop (notifications/cancelled); the
            # outer one only bounds a write to a child that stopped reading its stdin.
            async with asyncio.timeout(timeout_s + 1.0):
                result = await session.call_tool(tool.remote_name, dict(arguments), read_timeout_seconds=timeout_s)
        except TimeoutError:
            raise McpToolError(f"{name} timed out after {timeout_s:g}s") from None
        except MCPError as exc:
            if exc.code == types.REQUEST_TIMEOUT:
                raise McpToolError(f"{name} timed out after {timeout_s:g}s") from None
            if exc.code == types.CONNECTION_CLOSED:
                if server.closing:
                    raise McpToolError(f"{name} interrupted: the tool-executor is shutting down") from None
                # Not retried: the call may have run before the server died.
                raise McpToolError(
                    f"{name} failed: MCP server {tool.server} exited during the call (restarted on the next call)"
                ) from None
            raise McpToolError(f"{name} failed: {exc.message}") from None
        except (RuntimeError, ValueError) as exc:  # e.g. a result shape this client does not take
            raise McpToolError(f"{name} failed: unexpected response ({exc})") from None
        text = _result_text(result)
        if result.is_error:
            raise McpToolError(text or f"{name} failed (no details)")
        return text

    async def close(self) -> None:
        """Stop every server; returns once their processes are gone."""
        await asyncio.gather(*(s.close() for s in self._servers.values()))
