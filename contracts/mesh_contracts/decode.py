"""Bounded decoding: what every message body passes before the contract's validation.

A body from a tenant (or from a compromised service) is hostile until decoded. It is decoded
once, here, by code that cannot be made to recurse, allocate or run without bound, and every
way it can fail is a ``DecodeError`` with a readable reason (``decode: nesting deeper than 64``,
``decode: body 2.1 MB over the 256 KB limit``) that the consumer dead-letters on the first
delivery:

- the body's size, against the contract's limit (``ContractSpec.max_bytes``) or a lower one;
- valid UTF-8;
- JSON, an object at the top;
- nesting no deeper than ``max_depth``;
- integers of at most ``max_int_digits`` digits, no ``NaN`` / ``Infinity`` (not JSON);
- no key twice in one object where the contract says so (``ContractSpec.unique_keys``: the
  messages tenants write, where two parsers disagreeing on which duplicate wins is an attack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mesh_contracts.errors import ContractsError

KB = 1024
MB = 1024 * KB
DEFAULT_MAX_BYTES = 1 * MB
"""A message of a contract that declares no limit of its own."""


class DecodeError(ValueError, ContractsError):
    """A body the bounded decoder refused; the message is the reason (``decode: ...``). The
    contracts' ``parse`` raises it as a ``ContractError`` subclass (``BodyError``)."""


@dataclass(frozen=True)
class DecodeLimits:
    """Limits of the bounded decoder (a service's settings can lower them: ``MESH_DECODE_*``)."""

    max_bytes: int = 0
    """Cap on any body, on top of the contract's own limit (0: the contract's limit alone)."""
    max_depth: int = 64
    max_int_digits: int = 20


DEFAULT_LIMITS = DecodeLimits()


def size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n / KB:.0f} KB" if n >= KB else f"{n} bytes"


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"decode: {name} is not a JSON number")


def decode(data: bytes | str, *, max_bytes: int, unique_keys: bool, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """The body as Python values, or ``DecodeError`` with the reason. Never raises anything else."""
    limit = min(max_bytes, limits.max_bytes) if limits.max_bytes else max_bytes
    if len(data) > limit:
        raise DecodeError(f"decode: body {size(len(data))} over the {size(limit)} limit")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"decode: invalid UTF-8 at byte {exc.start}") from None
    else:
        text = data

    def integer(digits: str) -> int:
        if len(digits) - digits.startswith("-") > limits.max_int_digits:
            raise DecodeError(f"decode: an integer of {len(digits)} digits (at most {limits.max_int_digits})")
        return int(digits)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            twice = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise DecodeError(f"decode: key {twice[:40]!r} appears twice in one object")
        return out

    try:
        value = json.loads(
            text,
            parse_int=integer,
            parse_constant=_reject_constant,
            object_pairs_hook=pairs if unique_keys else None,
        )
    except DecodeError:
        raise
    except RecursionError:
        raise DecodeError(f"decode: nesting deeper than {limits.max_depth}") from None
    except json.JSONDecodeError as exc:
        raise DecodeError(f"decode: not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    except (ValueError, TypeError, MemoryError) as exc:  # e.g. a float json cannot represent
        raise DecodeError(f"decode: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"decode: the body is a JSON {type(value).__name__}, not an object")
    if text.count("[") + text.count("{") > limits.max_depth and depth(value) > limits.max_depth:
        raise DecodeError(f"decode: nesting deeper than {limits.max_depth}")
    return value


def depth(value: Any) -> int:
    """How deeply ``value`` nests (iteratively: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v if isinstance(x, dict | list))
    return deepest
