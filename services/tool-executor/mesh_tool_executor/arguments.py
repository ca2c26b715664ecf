"""A tool's arguments are what its schema defines, and nothing else.

A schema that does not say whether it takes other properties (JSON Schema's default: it does)
is read here as closed: the mesh's rule, for built-ins (their models forbid extra fields) and for
mounted MCP tools alike, whose ``inputSchema`` comes from a server that may read an argument it
never declared (a ``tenant``, an ``as_user``). A tool that does take free-form arguments says so
with ``additionalProperties`` (or ``patternProperties``, or ``unevaluatedProperties``) at its top
level. The rule is for the arguments object itself; a nested object is checked as its own schema
says.

``closed`` makes the rule part of the schema, so the catalogue offers models what is enforced;
``problem`` gives the one line an agent reads when a call does not fit.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

_OPEN_KEYS = ("additionalProperties", "unevaluatedProperties")
_BRANCHES = ("allOf", "anyOf", "oneOf")
_MAX_DEPTH = 8


def _declared(schema: Mapping[str, Any], node: Any, depth: int = 0) -> list[str]:
    """Property names ``node`` declares, in its own ``properties`` and in the branches it is
    composed of (``allOf``/``anyOf``/``oneOf``, ``if``/``then``/``else``, local ``$ref``s): a
    property a branch defines is one the tool takes."""
    if not isinstance(node, Mapping) or depth > _MAX_DEPTH:
        return []
    names = list(node.get("properties") or {})
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, Mapping) else None
        names += _declared(schema, target, depth + 1)
    for key in _BRANCHES:
        for branch in node.get(key) or ():
            names += _declared(schema, branch, depth + 1)
    for key in ("if", "then", "else"):
        names += _declared(schema, node.get(key), depth + 1)
    return list(dict.fromkeys(names))


def closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with ``additionalProperties: false`` at its top level when it says nothing
    about other properties; properties declared only in its branches are listed at the top
    (as ``{}``: the branches still constrain them), so closing it refuses none of them."""
    out = copy.deepcopy(dict(schema))
    if any(k in out for k in _OPEN_KEYS) or "patternProperties" in out:
        return out  # the tool said what else it takes
    own = dict(out.get("properties") or {})
    for name in _declared(out, out):
        own.setdefault(name, {})
    out["properties"] = own
    out["additionalProperties"] = False
    return out


def validator(schema: Mapping[str, Any]) -> Validator:
    """A validator of ``closed(schema)`` for the schema's own draft (2020-12 when it names none);
    ``jsonschema.SchemaError`` when the schema itself is invalid."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(closed(schema))


def unexpected(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[str]:
    """The arguments a closed schema does not define (none when it takes other properties)."""
    if schema.get("additionalProperties", True) is not False:
        return []
    known = schema.get("properties") or {}
    patterns = list(schema.get("patternProperties") or {})
    return [k for k in arguments if k not in known and not any(re.search(p, k) for p in patterns)]


def refusal(tool: str, names: list[str], takes: list[str]) -> str:
    """The one line an agent reads for arguments a tool does not define."""
    which = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
    noun = "argument" if len(names) == 1 else "arguments"
    return f"invalid arguments for {tool}: unexpected {noun} {which} ({tool} takes {', '.join(takes) or 'none'})"


def problem(tool: str, check: Validator, arguments: Any) -> str | None:
    """Why ``arguments`` do not fit the tool's (closed) schema, in one line, or None."""
    if not isinstance(arguments, Mapping):
        return f"invalid arguments for {tool}: $: must be an object"
    schema = check.schema
    assert isinstance(schema, Mapping)
    extra = unexpected(schema, arguments)
    if extra:
        return refusal(tool, extra, list(schema.get("properties") or {}))
    error = best_match(check.iter_errors(dict(arguments)))
    if error is None:
        return None
    message = error.message
    if len(message) > 200:  # the message quotes the value, which may be huge
        message = f"fails {error.validator} {error.validator_value!r}"[:200]
    return f"invalid arguments for {tool}: {error.json_path}: {message}"
