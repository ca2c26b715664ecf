"""``meshctl budget``: settled spend, read from the ``budget`` KV bucket.

The budget service writes two kinds of record there (see ``mesh_budget.ledger``; this
module reads the JSON and imports nothing from the service):

- ``usage.<tenant>.<task_id>``: one task's spend, in total and by agent, step and model;
- ``tenant.<tenant>.<yyyymmdd>``: one tenant's spend on one UTC day, by agent and model.

Every usage tally is ``{input_tokens, output_tokens, cached_input_tokens, cost_usd, calls}``.
The renderers are pure functions of those dicts; a missing field reads as zero.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypedDict

from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from mesh_durable.tail import Reader
from meshctl.errors import MeshctlError

BUCKET = "budget"
TOP_TASKS = 20


def usage_key(tenant: str, task_id: str) -> str:
    return f"usage.{tenant}.{task_id}"


def day_key(tenant: str, day: str) -> str:
    return f"tenant.{tenant}.{day}"


def today(at: float | None = None) -> str:
    """The UTC day the budget service files spend under."""
    return time.strftime("%Y%m%d", time.gmtime(at if at is not None else time.time()))


# --- loading ----------------------------------------------------------------------------------


class BadRecord(MeshctlError):
    """A value in the bucket is not the JSON object the budget service writes."""


def _decode(key: str, raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise BadRecord(f"{BUCKET} bucket, key {key}: not JSON") from None
    if not isinstance(value, dict):
        raise BadRecord(f"{BUCKET} bucket, key {key}: not a JSON object")
    return value


async def get(kv: KeyValue, key: str) -> dict[str, Any] | None:
    """The record under ``key``, or None if there is none (never written, or deleted)."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # KeyDeletedError is one
        return None
    return _decode(key, entry.value)


async def scan(nc: NATS, bucket: str, pattern: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """Every live record of ``bucket`` whose key matches the NATS subject ``pattern`` (``*`` and
    ``>`` wildcards), latest revision only: one direct get (``multi_last``), no consumer, so the
    server filters and the answer is complete (provisioning makes every bucket allow direct gets).

    Not ``KeyValue.watch()``: it decides its end-of-history marker by comparing the consumer's
    pending count with what the client has processed so far, and when the server has pushed every
    record before the callback ran, the marker comes first and the scan returns nothing (1 scan
    in 500 of a 12-key bucket; ``meshctl status`` once showed no quotas that way)."""
    reader = Reader(nc, f"KV_{bucket}", timeout=timeout)
    try:
        current = await reader.current(bucket, pattern)
    finally:
        await reader.close()
    out: dict[str, dict[str, Any]] = {}
    for key, entry in current.items():
        value = _decode(key, entry.data)
        if value is not None:
            out[key] = value
    return out


# --- rendering --------------------------------------------------------------------------------


class Usage(TypedDict):
    """A usage tally with every field present (``_u``: a missing one reads as zero)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: float
    calls: int


def _u(usage: dict[str, Any] | None) -> Usage:
    usage = usage or {}
    return {
        "input_tokens": int(usage.get("input_tokens") or 0),
        "output_tokens": int(usage.get("output_tokens") or 0),
        "cached_input_tokens": int(usage.get("cached_input_tokens") or 0),
        "cost_usd": float(usage.get("cost_usd") or 0.0),
        "calls": int(usage.get("calls") or 0),
    }


def cost_of(record: dict[str, Any]) -> float:
    return _u(record.get("total"))["cost_usd"]


def _summary(usage: dict[str, Any] | None) -> str:
    u = _u(usage)
    cached = f" ({u['cached_input_tokens']} cached)" if u["cached_input_tokens"] else ""
    return (
        f"{u['input_tokens']} tokens in{cached}, {u['output_tokens']} out, "
        f"{u['calls']} call{'' if u['calls'] == 1 else 's'}, ${u['cost_usd']:.6f}"
    )


def _when(at: Any) -> str:
    try:
        t = float(at)
    except (TypeError, ValueError):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t > 0 else "-"


def _table(title: str, rows: list[tuple[str, dict[str, Any] | None, list[str]]], extra: tuple[str, ...] = ()) -> str:
    """``rows``: (name, usage (None: none recorded), extra cells). Sorted by the caller."""
    header = (title, "TOKENS IN", "TOKENS OUT", "CALLS", "COST_USD", *extra)
    cells = [
        (
            name,
            str(u["input_tokens"]),
            str(u["output_tokens"]),
            str(u["calls"]),
            f"{u['cost_usd']:.6f}",
            *more,
        )
        for name, u, more in ((n, _u(usage), more) for n, usage, more in rows)
    ]
    widths = [max(len(str(c[i])) for c in (header, *cells)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        first = f"{row[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(row[1:5], widths[1:5], strict=True)]
        tail = [f"{c:<{w}}" for c, w in zip(row[5:], widths[5:], strict=True)]
        return "  ".join([first, *rest, *tail]).rstrip()

    if not cells:
        return f"{title}\n  (none)"
    return "\n".join([line(header), *(line(c) for c in cells)])


def _breakdown(title: str, by: dict[str, Any] | None) -> str:
    rows = sorted((by or {}).items(), key=lambda kv: (-_u(kv[1])["cost_usd"], kv[0]))
    return _table(title, [(name, usage, []) for name, usage in rows])


def render_task(task: dict[str, Any]) -> str:
    """One task's spend (a ``usage.<tenant>.<task>`` record): totals, then by agent, step, model."""
    errors = int(task.get("errors") or 0)
    head = f"task {task.get('tenant', '?')}/{task.get('task_id', '?')}: {_summary(task.get('total'))}"
    if errors:
        head += f", {errors} failed call{'' if errors == 1 else 's'}"
    head += f" (updated {_when(task.get('updated_at'))} UTC)"
    if task.get("labels"):
        head += "\nlabels: " + ", ".join(f"{k}={v}" for k, v in sorted(task["labels"].items()))
    return "\n\n".join(
        [
            head,
            _breakdown("BY AGENT", task.get("by_agent")),
            _breakdown("BY STEP", task.get("by_step")),
            _breakdown("BY MODEL", task.get("by_model")),
        ]
    )


def render_day(day: dict[str, Any], tasks: list[dict[str, Any]], top: int = TOP_TASKS) -> str:
    """One tenant's day (a ``tenant.<tenant>.<day>`` record; ``{tenant, day}`` alone if
    nothing was spent that day) and the tenant's tasks, most expensive first, at most ``top``."""
    tenant, d = day.get("tenant", "?"), day.get("day", "?")
    if "total" in day:
        n = int(day.get("tasks") or 0)
        head = f"tenant {tenant} on {d} (UTC): {_summary(day['total'])}, {n} task{'' if n == 1 else 's'}"
    else:
        head = f"tenant {tenant} on {d} (UTC): no spend recorded"
    parts = [head]
    if "total" in day:
        parts += [_breakdown("BY AGENT", day.get("by_agent")), _breakdown("BY MODEL", day.get("by_model"))]
        if day.get("by_label"):  # task.submitted labels: cost by team, by user
            parts.append(_breakdown("BY LABEL", day.get("by_label")))
    ranked = sorted(tasks, key=lambda t: (-cost_of(t), str(t.get("task_id", ""))))
    shown = ranked[:top]
    caption = f"tasks: {len(shown)} of {len(ranked)} (every retained day), most expensive first"
    table = _table(
        "TASK",
        [(str(t.get("task_id", "?")), t.get("total"), [_when(t.get("updated_at"))]) for t in shown],
        extra=("UPDATED (UTC)",),
    )
    parts.append(f"{caption}\n{table}")
    return "\n\n".join(parts)


def render_days(day: str, days: list[dict[str, Any]]) -> str:
    """One line per tenant for one day (the ``tenant.*.<day>`` records), by tenant."""
    rows = sorted(days, key=lambda d: str(d.get("tenant", "")))
    table = _table(
        "TENANT",
        [(str(r.get("tenant", "?")), r.get("total"), [str(int(r.get("tasks") or 0))]) for r in rows],
        extra=("TASKS",),
    )
    return f"spend on {day} (UTC)\n\n{table}"
