"""A tool's arguments are exactly what its schema defines (issue 36, item 5): built-ins forbid
other fields, and an MCP tool's schema that says nothing of other properties is read closed."""

from __future__ import annotations

import pytest

from mesh_tool_executor import arguments as schemas
from mesh_tool_executor.tools import REGISTRY, Registry, Tool, ToolError

pytestmark = pytest.mark.unit


async def _run(args, ctx) -> str:
    return "ran"


def _mounted(schema: dict) -> Registry:
    reg = Registry()
    reg.add(Tool("crm__update", "An MCP tool", None, _run, risk="write", input_schema=schema, source="mcp:crm"))
    return reg


def test_a_built_in_refuses_an_argument_it_does_not_define_naming_it():
    reg = Registry()
    with pytest.raises(ToolError) as exc:
        reg.validate("send_email", {"to": "ops@acme.test", "subject": "s", "body": "b", "tenant": "globex"})
    assert str(exc.value) == (
        "invalid arguments for send_email: unexpected argument 'tenant' (send_email takes to, subject, body)"
    )
    with pytest.raises(ToolError, match=r"^invalid arguments for note_list: unexpected arguments 'tenant', 'all' "):
        reg.validate("note_list", {"tenant": "globex", "all": True})
    # named first, before what is missing: the mistake a retry must not repeat
    with pytest.raises(ToolError, match=r"unexpected argument 'tenant' \(calculator takes expression\)"):
        reg.validate("calculator", {"tenant": "globex"})
    _, args = reg.validate("calculator", {"expression": "1+1"})
    assert args.expression == "1+1"


def test_every_built_in_offers_models_a_closed_schema():
    for tool in REGISTRY.values():
        assert tool.schema()["additionalProperties"] is False, tool.name


def test_an_mcp_schema_silent_on_other_properties_is_read_closed():
    schema = {"type": "object", "properties": {"tenant": {"type": "string"}, "key": {"type": "string"}},
              "required": ["key"]}  # fmt: skip
    reg = _mounted(schema)
    with pytest.raises(ToolError) as exc:
        reg.validate("crm__update", {"tenant": "acme", "key": "k", "as_tenant": "globex"})
    assert str(exc.value) == (
        "invalid arguments for crm__update: unexpected argument 'as_tenant' (crm__update takes tenant, key)"
    )
    assert reg.validate("crm__update", {"key": "k"})[1] == {"key": "k"}
    with pytest.raises(ToolError, match=r"^invalid arguments for crm__update: \$\.key: 5 is not of type 'string'$"):
        reg.validate("crm__update", {"key": 5})
    with pytest.raises(ToolError, match=r"\$: must be an object"):
        reg.validate("crm__update", ["k"])  # type: ignore[arg-type]
    offered = reg.get("crm__update").schema()  # type: ignore[union-attr]
    assert offered["additionalProperties"] is False and "additionalProperties" not in schema, "the server's is kept"


def test_a_schema_that_takes_other_properties_says_so_and_is_believed():
    for opened in ({"additionalProperties": True}, {"additionalProperties": {"type": "string"}},
                   {"patternProperties": {"^x-": {"type": "string"}}}):  # fmt: skip
        schema = {"type": "object", "properties": {"key": {"type": "string"}}, **opened}
        assert schemas.closed(schema) == schema
    reg = _mounted({"type": "object", "properties": {"key": {}}, "patternProperties": {"^x-": {"type": "string"}}})
    assert reg.validate("crm__update", {"key": 1, "x-trace": "t"})[1] == {"key": 1, "x-trace": "t"}
    with pytest.raises(ToolError, match="x-trace"):
        reg.validate("crm__update", {"x-trace": 3})


def test_properties_declared_in_branches_are_not_refused_by_closing():
    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}},
        "allOf": [{"$ref": "#/$defs/base"}],
        "oneOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]},
                  {"properties": {"b": {"type": "integer"}}, "required": ["b"]}],
        "$defs": {"base": {"properties": {"id": {"type": "string"}}}},
    }  # fmt: skip
    reg = _mounted(schema)
    assert reg.validate("crm__update", {"kind": "a", "id": "1", "a": "x"})[1]["a"] == "x"
    with pytest.raises(ToolError, match=r"unexpected argument 'tenant' \(crm__update takes kind, id, a, b\)"):
        reg.validate("crm__update", {"kind": "a", "id": "1", "a": "x", "tenant": "globex"})
    with pytest.raises(ToolError, match=r"invalid arguments for crm__update: \$"):
        reg.validate("crm__update", {"kind": "b", "b": "not a number"})
