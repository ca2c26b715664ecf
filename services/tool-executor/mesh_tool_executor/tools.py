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


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[BaseModel]
    run: Callable[[Any], Awaitable[str]]
    risk: Literal["read", "write", "external"] = "read"
    timeout_s: float = 5.0

    def schema(self) -> dict[str, Any]:
        return self.args.model_json_schema()


class CalculatorArgs(BaseModel):
    expression: str = Field(min_length=1, max_length=200)


class TextStatsArgs(BaseModel):
    text: str = Field(max_length=100_000)


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


async def calculator(args: CalculatorArgs) -> str:
    """Exact decimal arithmetic on a parsed expression; no eval of code."""
    getcontext().prec = 40
    try:
        value = _eval(ast.parse(args.expression, mode="eval"))
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {args.expression!r}") from None
    except (DivisionByZero, InvalidOperation, ZeroDivisionError):
        raise ToolError("division by zero") from None
    return format(value.normalize(), "f") if value == value.to_integral_value() else str(value.normalize())


async def text_stats(args: TextStatsArgs) -> str:
    words = args.text.split()
    return f"{len(words)} words, {len(args.text)} characters"


REGISTRY: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("calculator", "Evaluate an arithmetic expression exactly.", CalculatorArgs, calculator),
        Tool("text_stats", "Count words and characters of a text.", TextStatsArgs, text_stats),
    )
}


async def execute(name: str, arguments: dict[str, Any]) -> str:
    """Validate and run a tool; raises ``ToolError`` with a message meant for the agent."""
    tool = REGISTRY.get(name)
    if tool is None:
        raise ToolError(f"unknown tool {name!r} (available: {', '.join(sorted(REGISTRY))})")
    try:
        args = tool.args.model_validate(arguments)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ToolError(f"invalid arguments for {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        return await asyncio.wait_for(tool.run(args), tool.timeout_s)
    except TimeoutError:
        raise ToolError(f"{name} timed out after {tool.timeout_s:.0f}s") from None
