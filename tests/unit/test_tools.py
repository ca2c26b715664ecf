"""Tool registry: validated arguments, structured errors, a calculator that evaluates no code."""

from __future__ import annotations

import pytest

from mesh_tool_executor.tools import REGISTRY, ToolError, execute

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("expr", "result"),
    [
        ("17 * 23", "391"),
        ("2 ** 10", "1024"),
        ("7 / 2", "3.5"),
        ("(1 + 2) * -3", "-9"),
        ("0.1 + 0.2", "0.3"),
        ("10 // 3", "3"),
    ],
)
async def test_calculator_is_exact(expr, result):
    assert await execute("calculator", {"expression": expr}) == result


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("__import__('os').system('id')", "invalid arguments for calculator: expression: String should match pattern"),
        ("(1)(2)", "unsupported syntax: Call"),  # past the schema's characters, the parser still refuses code
        ("1 / 0", "division by zero"),
        ("9 ** 9999", "exponent too large"),
        ("17 *", "not an arithmetic expression"),
    ],
)
async def test_calculator_refuses_with_a_reason(expr, error):
    with pytest.raises(ToolError, match=error):
        await execute("calculator", {"expression": expr})


async def test_hallucinated_tool_and_bad_arguments_are_structured_errors():
    with pytest.raises(
        ToolError,
        match=r"unknown tool 'rm_rf' \(available: await_step, calculator, http_get, note_delete, note_list, note_read, "
        r"note_write, send_email, text_stats\)",
    ):
        await execute("rm_rf", {})
    # a misnamed argument is named as unexpected, with the ones the tool takes (the fix is in the line)
    with pytest.raises(ToolError, match=r"invalid arguments for calculator: unexpected argument 'expr' \(calculator "
                       r"takes expression\)"):  # fmt: skip
        await execute("calculator", {"expr": "1+1"})
    with pytest.raises(ToolError, match="invalid arguments for calculator: expression: Field required"):
        await execute("calculator", {})


def test_every_tool_publishes_a_json_schema_and_a_risk_class():
    for tool in REGISTRY.values():
        assert tool.schema()["type"] == "object"
        assert tool.risk in ("read", "write", "external")
