"""The tool registry: each tool has an argument model (its JSON schema), a risk class and a timeout."""

from __future__ import annotations

import ast
import asyncio
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, DivisionByZero, InvalidOperation, getcontext
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError


class ToolError(Exception):
    """A structured error returned to the agent (never a crash of the executor)."""


Effect = Callable[[str, bytes, str], Awaitable[str]]
"""Performs an external effect: (sink subject suffix, payload, idempotency key) -> receipt."""


StepLookup = Callable[[str], Awaitable[tuple[str, str, str]]]
"""(step id) -> (task status, step status, step output) from the task record."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about its call. ``key`` is the call's idempotency key."""

    tenant: str
    task_id: str
    key: str
    effect: Effect | None = None
    step_state: StepLookup | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[BaseModel]
    run: Callable[[Any, ToolContext], Awaitable[str]]
    risk: Literal["read", "write", "external"] = "read"
    timeout_s: float = 5.0

    def schema(self) -> dict[str, Any]:
        return self.args.model_json_schema()


class CalculatorArgs(BaseModel):
    expression: str = Field(min_length=1, max_length=200)


class TextStatsArgs(BaseModel):
    text: str = Field(max_length=100_000)


class SendEmailArgs(BaseModel):
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=254)
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(max_length=20_000)


class AwaitStepArgs(BaseModel):
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


_OPS: dict[type, Callable[[Any, Any], Any]] = {
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


REGISTRY: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("calculator", "Evaluate an arithmetic expression exactly.", CalculatorArgs, calculator),
        Tool("text_stats", "Count words and characters of a text.", TextStatsArgs, text_stats),
        Tool(
            "await_step",
            "Wait for another step of this task to complete and return its output.",
            AwaitStepArgs,
            await_step,
            timeout_s=600.0,
        ),
        Tool(
            "send_email",
            "Send an email (external side effect; once per call).",
            SendEmailArgs,
            send_email,
            risk="external",
        ),
    )
}


async def execute(name: str, arguments: dict[str, Any], ctx: ToolContext | None = None) -> str:
    """Validate and run a tool; raises ``ToolError`` with a message meant for the agent."""
    ctx = ctx or ToolContext(tenant="-", task_id="-", key="-")
    tool = REGISTRY.get(name)
    if tool is None:
        raise ToolError(f"unknown tool {name!r} (available: {', '.join(sorted(REGISTRY))})")
    try:
        args = tool.args.model_validate(arguments)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ToolError(f"invalid arguments for {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        return await asyncio.wait_for(tool.run(args, ctx), tool.timeout_s)
    except TimeoutError:
        raise ToolError(f"{name} timed out after {tool.timeout_s:.0f}s") from None
