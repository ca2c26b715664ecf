"""The built-in tools and the registry: each tool has an argument schema, a risk class, a
timeout, a per-tenant rate limit and an approval policy.

Risk classes: ``read`` tools only look (a calculator, a note read); ``write`` tools change
state the tenant owns (notes, settings); ``external`` tools reach the outside world (an
email, an HTTP request whose URL can carry data out). Write and external tools run under the
idempotency ledger with the call's deterministic key, and the policy (``policy.py``) decides
whether they need a human first.
"""

from __future__ import annotations

import ast
import asyncio
import json
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal, DivisionByZero, InvalidOperation, getcontext
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh_contracts.v1.records import CatalogueTool, ToolCatalogue
from mesh_tool_executor import arguments as schemas
from mesh_tool_executor.destinations import role_of
from mesh_tool_executor.errors import ToolExecutorError


class ToolError(ToolExecutorError):
    """A structured error returned to the agent (never a crash of the executor)."""


Effect = Callable[[str, bytes, str], Awaitable[str]]
"""Performs an external effect: (sink subject suffix, payload, idempotency key) -> receipt."""


StepLookup = Callable[[str], Awaitable[tuple[str, str, str]]]
"""(step id) -> (task status, step status, step output) from the task record."""


class Notes(Protocol):
    """Where the notes tools keep a tenant's notes (the ``notes`` KV bucket in the mesh)."""

    async def get(self, tenant: str, note_id: str) -> str | None: ...
    async def put(self, tenant: str, note_id: str, text: str) -> None: ...
    async def delete(self, tenant: str, note_id: str) -> bool: ...
    async def list(self, tenant: str) -> list[str]: ...


class MemoryNotes(Notes):
    """Notes in a dict: for in-memory tests and ``execute()`` without a mesh."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}

    async def get(self, tenant: str, note_id: str) -> str | None:
        return self.data.get((tenant, note_id))

    async def put(self, tenant: str, note_id: str, text: str) -> None:
        self.data[(tenant, note_id)] = text

    async def delete(self, tenant: str, note_id: str) -> bool:
        return self.data.pop((tenant, note_id), None) is not None

    async def list(self, tenant: str) -> list[str]:
        return sorted(n for t, n in self.data if t == tenant)


Fetch = Callable[[str], Awaitable[str]]
"""Fetches a URL under the SSRF policy and returns the page as text (``net.fetch`` in the mesh)."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about its call. ``key`` is the call's idempotency key."""

    tenant: str
    task_id: str
    key: str
    effect: Effect | None = None
    step_state: StepLookup | None = None
    notes: Notes | None = None
    fetch: Fetch | None = None
    observe: Callable[[Any], None] | None = None
    """Told where a call to a tenant's tool server went (its ``CallRoute``)."""


Risk = Literal["read", "write", "external"]
OnUntrusted = Literal["approve", "allow", "deny"]


@dataclass(frozen=True)
class Tool:
    """One registered tool and its policy.

    ``on_untrusted`` says what happens when a step whose context holds untrusted content (a
    retrieved passage, a web page, another tool's output) asks for this tool: ``approve`` (a
    human decides), ``allow`` or ``deny``. It defaults to ``approve`` for write and external
    tools and ``allow`` for read tools. ``trusted_args`` names the arguments that decide where
    an effect lands (an email's recipient, a URL), each with its role (``"to"``, ``"url"``, or
    ``"name:role"`` with role ``recipient``, ``url`` or ``value``; a name alone takes the role
    its name suggests, else ``value``): when the tenant's goal offers every one of them in its
    role (``destinations.py``), injected text cannot have chosen them and the call runs without
    a human, unless what else it carries is flagged as an injection."""

    name: str
    description: str
    args: type[BaseModel] | None
    run: Callable[[Any, ToolContext], Awaitable[str]]
    risk: Risk = "read"
    timeout_s: float = 5.0
    needs_approval: bool = False
    """Always ask a human, tainted or not."""
    on_untrusted: OnUntrusted | None = None
    trusted_args: tuple[str, ...] = ()
    rate_per_min: int = 0
    """Calls per minute per tenant (0: unlimited)."""
    untrusted_output: bool = False
    """The result is outside content: the worker delimits it and taints the step."""
    input_schema: dict[str, Any] | None = None
    """JSON schema for tools without a pydantic model (MCP tools); read closed (``arguments.py``)."""
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def destination_args(self) -> tuple[str, ...]:
        """The names of ``trusted_args`` (without their roles)."""
        return tuple(a.partition(":")[0] for a in self.trusted_args)

    @property
    def untrusted_policy(self) -> OnUntrusted:
        return self.on_untrusted or ("allow" if self.risk == "read" else "approve")

    def schema(self) -> dict[str, Any]:
        """The arguments' JSON schema as it is enforced (closed: see ``arguments.py``)."""
        if self.input_schema is not None:
            return schemas.closed(self.input_schema)
        assert self.args is not None
        return self.args.model_json_schema()

    def describe(self) -> CatalogueTool:
        """The catalogue entry the worker offers to models (and operators read)."""
        return CatalogueTool(
            name=self.name,
            description=self.description,
            parameters=self.schema(),
            risk=self.risk,
            needs_approval=self.needs_approval,
            on_untrusted=self.untrusted_policy,
            trusted_args=list(self.trusted_args),
            rate_per_min=self.rate_per_min,
            timeout_s=self.timeout_s,
            untrusted_output=self.untrusted_output,
            source=self.source,
        )


class Args(BaseModel):
    """A built-in tool's arguments: exactly the fields it defines. Another argument is refused
    (``additionalProperties: false`` in the schema models are offered), not ignored: a call
    carrying ``"tenant": "globex"`` must not look as if it had been honoured."""

    model_config = ConfigDict(extra="forbid")


class CalculatorArgs(Args):
    # The characters of the expressions ``_eval`` takes, starting as a number, a sign or a bracket:
    # a model held to the schema (a local model's grammar) cannot write anything else into it
    # (SmolLM2 wrote ", 17, 23, 17, ..." until max_tokens, then ".17 * 23").
    expression: str = Field(min_length=1, max_length=200, pattern=r"^[-+(0-9][0-9.eE_+\-*/%() ]*$")


class TextStatsArgs(Args):
    text: str = Field(max_length=100_000)


class SendEmailArgs(Args):
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(max_length=20_000)


class AwaitStepArgs(Args):
    step_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


AWAIT_POLL_S = 0.25


async def await_step(args: AwaitStepArgs, ctx: ToolContext) -> str:
    """An agent waits for another step of its task and gets its output: the agent-to-agent wait.
    Two steps that await each other never finish; the budget service sees the cycle in the
    wait-for graph and cancels the task, which ends this wait with an error."""
    if ctx.step_state is None:
        raise ToolError("await_step is not available here (no task records)")
    while True:
        task_status, status, output = await ctx.step_state(args.step_id)
        if status == "completed":
            return output
        if status == "":
            raise ToolError(f"step {args.step_id} is not part of this task's plan")
        if status == "failed":
            raise ToolError(f"step {args.step_id} failed; its output will never come")
        if task_status in ("failed", "cancelled", "completed", "halted"):
            raise ToolError(f"stopped waiting for {args.step_id}: the task is {task_status}")
        await asyncio.sleep(AWAIT_POLL_S)


_OPS: dict[type[ast.operator], Callable[[Decimal, Decimal], Decimal]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _eval(node: ast.AST) -> Decimal:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Decimal(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
            raise ToolError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ToolError(f"unsupported syntax: {type(node).__name__} (numbers and + - * / // % ** only)")


async def calculator(args: CalculatorArgs, ctx: ToolContext) -> str:
    """Exact decimal arithmetic on a parsed expression; no eval of code."""
    getcontext().prec = 40
    try:
        value = _eval(ast.parse(args.expression, mode="eval"))
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {args.expression!r}") from None
    except (DivisionByZero, InvalidOperation, ZeroDivisionError):
        raise ToolError("division by zero") from None
    return format(value.normalize(), "f") if value == value.to_integral_value() else str(value.normalize())


async def text_stats(args: TextStatsArgs, ctx: ToolContext) -> str:
    words = args.text.split()
    return f"{len(words)} words, {len(args.text)} characters"


async def send_email(args: SendEmailArgs, ctx: ToolContext) -> str:
    """Hand the message to the outbox (the stand-in for an email provider). The provider is
    given the call's idempotency key, so a retry of the same call is one email, not two."""
    if ctx.effect is None:
        raise ToolError("send_email is not available here (no outbox)")
    payload = args.model_dump_json().encode()
    receipt = await ctx.effect(f"{ctx.tenant}.{ctx.task_id}.email", payload, ctx.key)
    return f"queued email to {args.to} ({receipt})"


NOTE_ID = r"^[A-Za-z0-9_-]{1,64}$"


class NoteIdArgs(Args):
    note_id: str = Field(pattern=NOTE_ID)


class NoteWriteArgs(Args):
    note_id: str = Field(pattern=NOTE_ID)
    text: str = Field(max_length=20_000)


class NoteListArgs(Args):
    pass


class HttpGetArgs(Args):
    url: str = Field(min_length=8, max_length=2000, pattern=r"^https?://")


def _notes(ctx: ToolContext) -> Notes:
    if ctx.notes is None:
        raise ToolError("notes are not available here (no notes store)")
    return ctx.notes


async def note_write(args: NoteWriteArgs, ctx: ToolContext) -> str:
    await _notes(ctx).put(ctx.tenant, args.note_id, args.text)
    return f"saved note {args.note_id} ({len(args.text)} characters)"


async def note_read(args: NoteIdArgs, ctx: ToolContext) -> str:
    text = await _notes(ctx).get(ctx.tenant, args.note_id)
    if text is None:
        raise ToolError(f"no note {args.note_id!r}")
    return text


async def note_delete(args: NoteIdArgs, ctx: ToolContext) -> str:
    if not await _notes(ctx).delete(ctx.tenant, args.note_id):
        raise ToolError(f"no note {args.note_id!r}")
    return f"deleted note {args.note_id}"


async def note_list(args: NoteListArgs, ctx: ToolContext) -> str:
    return json.dumps(await _notes(ctx).list(ctx.tenant))


async def http_get(args: HttpGetArgs, ctx: ToolContext) -> str:
    """Fetch a web page as text. Private, loopback and link-local destinations are refused
    after DNS resolution unless allow-listed (``net.py``)."""
    if ctx.fetch is None:
        raise ToolError("http_get is not available here (no network policy)")
    return await ctx.fetch(args.url)


BUILTINS: tuple[Tool, ...] = (
    Tool("calculator", "Evaluate an arithmetic expression exactly.", CalculatorArgs, calculator),
    Tool("text_stats", "Count words and characters of a text.", TextStatsArgs, text_stats),
    Tool(
        "await_step",
        "Wait for another step of this task to complete and return its output.",
        AwaitStepArgs,
        await_step,
        timeout_s=600.0,
        untrusted_output=True,  # another step's output may carry what that step read
    ),
    Tool(
        "send_email",
        "Send an email (external side effect; once per call).",
        SendEmailArgs,
        send_email,
        risk="external",
        trusted_args=("to",),
        rate_per_min=20,
    ),
    Tool(
        "http_get",
        "Fetch a web page (http/https) and return its text. Private addresses are refused.",
        HttpGetArgs,
        http_get,
        risk="external",  # a URL can carry data out, so a GET is an external effect
        timeout_s=15.0,
        trusted_args=("url",),
        rate_per_min=60,
        untrusted_output=True,
    ),
    Tool("note_read", "Read one of the tenant's notes.", NoteIdArgs, note_read, untrusted_output=True),
    Tool("note_list", "List the tenant's notes.", NoteListArgs, note_list),
    Tool(
        "note_write",
        "Create or replace a note of the tenant.",
        NoteWriteArgs,
        note_write,
        risk="write",
        rate_per_min=60,
    ),
    Tool("note_delete", "Delete a note of the tenant.", NoteIdArgs, note_delete, risk="write", rate_per_min=30),
)
REGISTRY: dict[str, Tool] = {t.name: t for t in BUILTINS}
"""The built-in tools (MCP tools are added to a service's own ``Registry``)."""

_POLICY_KEYS = {
    "risk",
    "needs_approval",
    "on_untrusted",
    "trusted_args",
    "rate_per_min",
    "timeout_s",
    "untrusted_output",
}


def with_policy(tool: Tool, overrides: dict[str, Any]) -> Tool:
    """``tool`` with policy fields overridden (from configuration); unknown keys are an error."""
    unknown = set(overrides) - _POLICY_KEYS
    if unknown:
        raise ValueError(f"tool {tool.name}: unknown policy key(s) {sorted(unknown)} (known: {sorted(_POLICY_KEYS)})")
    fields = dict(overrides)
    if "trusted_args" in fields:
        fields["trusted_args"] = tuple(fields["trusted_args"])
        for arg in fields["trusted_args"]:
            try:
                role_of(arg)
            except ValueError as exc:
                raise ValueError(f"tool {tool.name}: trusted_args {arg!r}: {exc}") from None
    if fields.get("risk", tool.risk) not in ("read", "write", "external"):
        raise ValueError(f"tool {tool.name}: risk must be read, write or external")
    if fields.get("on_untrusted", "approve") not in ("approve", "allow", "deny"):
        raise ValueError(f"tool {tool.name}: on_untrusted must be approve, allow or deny")
    return replace(tool, **fields)


class Registry:
    """The tools one tool-executor offers: the built-ins plus mounted MCP tools, with the
    policy overrides of its configuration applied."""

    def __init__(self, tools: dict[str, Tool] | None = None) -> None:
        self.tools: dict[str, Tool] = dict(REGISTRY if tools is None else tools)
        self._checks: dict[str, tuple[dict[str, Any], Any]] = {}  # name -> (schema, its validator)

    def add(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def catalogue(self) -> ToolCatalogue:
        """What the tool-executor publishes in KV ``tools`` (``ToolCatalogue``): every tool it serves."""
        return ToolCatalogue(tools=[t.describe() for t in sorted(self.tools.values(), key=lambda t: t.name)])

    def validate(self, name: str, arguments: dict[str, Any]) -> tuple[Tool, Any]:
        """The tool and its validated arguments; ``ToolError`` for a hallucinated tool or bad
        arguments (nothing has run)."""
        tool = self.tools.get(name)
        if tool is None:
            raise ToolError(f"unknown tool {name!r} (available: {', '.join(sorted(self.tools))})")
        if tool.args is None:
            why = self._schema_problem(tool, arguments)
            if why is not None:
                raise ToolError(why)
            return tool, dict(arguments)
        try:
            return tool, tool.args.model_validate(arguments)
        except ValidationError as exc:
            errors = exc.errors()
            extra = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"]]
            if extra:  # named first: the one mistake a retry must not repeat
                raise ToolError(schemas.refusal(name, extra, list(tool.args.model_fields))) from None
            first = errors[0]
            where = ".".join(map(str, first["loc"])) or "<arguments>"
            raise ToolError(f"invalid arguments for {name}: {where}: {first['msg']}") from None

    def _schema_problem(self, tool: Tool, arguments: Any) -> str | None:
        """Why ``arguments`` do not fit a tool known by its JSON schema (an MCP tool), read closed:
        checked here, before the policy, so a call that cannot run is never held for a human."""
        if tool.input_schema is None:
            return None
        cached = self._checks.get(tool.name)
        if cached is None or cached[0] is not tool.input_schema:
            cached = (tool.input_schema, schemas.validator(tool.input_schema))
            self._checks[tool.name] = cached
        return schemas.problem(tool.name, cached[1], arguments)

    async def run(self, tool: Tool, args: Any, ctx: ToolContext) -> str:
        try:
            return await asyncio.wait_for(tool.run(args, ctx), tool.timeout_s)
        except TimeoutError:
            raise ToolError(f"{tool.name} timed out after {tool.timeout_s:g}s") from None


async def execute(name: str, arguments: dict[str, Any], ctx: ToolContext | None = None) -> str:
    """Validate and run a built-in tool; raises ``ToolError`` with a message meant for the agent."""
    ctx = ctx or ToolContext(tenant="-", task_id="-", key="-", notes=MemoryNotes())
    reg = Registry()
    tool, args = reg.validate(name, arguments)
    return await reg.run(tool, args, ctx)
